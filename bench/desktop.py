"""Section: an embedding app's start, as examples/desktop/chat.py does it.

Each round is a fresh interpreter (an app being launched) that imports
procman, runs ``procman.prepare()`` (the build is cached: it only finds it)
and serves the model with ``procman.Supervisor``; the harness stamps each
step from the process's own start time, so interpreter start-up is counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import Section, cmdline, fmt, spread

_APP = """
import json, sys, time
t0 = time.time()
import procman
t_import = time.time()
import psutil  # after procman: its imports must not be counted as procman's
started = psutil.Process().create_time()  # the launch, as the OS recorded it
prepared = procman.prepare(sys.argv[1], binary=sys.argv[2]).result()
t_prepared = time.time()
with procman.Supervisor() as sup:
    sup.serve(sys.argv[1], binary=sys.argv[2], ctx=2048)
    t_ready = time.time()
print(json.dumps({
    "import procman": 1000 * (t_import - t0),
    "prepare() with the build cached": 1000 * (t_prepared - t_import),
    "serve() until ready": 1000 * (t_ready - t_prepared),
    "launch -> first ready model": 1000 * (t_ready - started),
}))
"""


def desktop_start(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    work.mkdir(parents=True, exist_ok=True)
    rounds = 3 if quick else 11
    argv = [sys.executable, "-c", _APP, str(model), str(binary)]
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300)
        for step, ms in json.loads(out.stdout.splitlines()[-1]).items():
            times.setdefault(step, []).append(ms)
    return {
        "title": "A desktop app's start: import, prepare, first ready model",
        "commands": {
            "app start (harness)": cmdline(
                [sys.executable, "-c", "<bench/desktop.py _APP>", model, binary]
            )
        },
        "header": ["step", "time"],
        "rows": [[step, fmt(spread(values), " ms", 1)] for step, values in times.items()],
        "raw": times,
        "notes": [
            f"{rounds} launches of a fresh interpreter doing what examples/desktop/chat.py does "
            "before its window can chat: `import procman`, `procman.prepare(model)` (the "
            "verified build found in the cache), `procman.Supervisor().serve(model)`.",
            "`launch -> first ready model` counts from the process's creation (as the OS "
            "records it, 10 ms resolution), so the interpreter's own start is included.",
            "A first run on a new machine adds the compile (see the build section), shown by "
            "the window as a percentage and cancellable.",
        ],
    }
