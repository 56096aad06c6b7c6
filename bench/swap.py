"""Model swap time: with room for one model, how long a request for the other one takes.

llamactl (``serve --config`` with ``max_loaded = 1``) against llama.cpp's own
router mode (``--models-dir`` with ``--models-max 1``), both serving the same
two model files and answering the same alternating one-token requests: every
request after the first names the model that is not loaded, so each one pays
for stopping the loaded server and starting the other.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from _common import (  # first: it puts the repository on sys.path
    HOST,
    LLAMACTL,
    SAME_SERVER,
    Section,
    _session,
    answered,
    cmdline,
    fmt,
    healthy,
    launched,
    one_token,
    ratios,
    spread,
    wait_until,
)

from procman.process._sockets import pick_free_port

__all__ = ["swap"]


def _models(model: Path, work: Path) -> Path:
    """Two names for the demo model: the servers see two models to swap between."""
    models = work / "swap-models"
    models.mkdir(parents=True, exist_ok=True)
    for name in ("swap-a.gguf", "swap-b.gguf"):
        with contextlib.suppress(FileExistsError):
            (models / name).symlink_to(model)
    return models


def _config(models: Path, port: int, work: Path) -> Path:
    lines = [
        "[server]",
        f'host = "{HOST}"',
        f"port = {port}",
        "max_loaded = 1",
    ]
    for name in ("a", "b"):
        lines += ["", f"[models.swap-{name}]", f'path = "{models / f"swap-{name}.gguf"}"']
    path = work / "swap.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def swap(binary: Path, model: Path, work: Path, quick: bool) -> Section:
    rounds = 4 if quick else 10
    models = _models(model, work)
    p1, p2 = pick_free_port(HOST), pick_free_port(HOST)
    config = _config(models, p1, work)
    argvs = {
        "llamactl (max_loaded = 1)": [
            *LLAMACTL, "serve", "--config", str(config), "--server", str(binary),
        ],
        "llama.cpp router (--models-max 1)": [
            str(binary), "--models-dir", str(models), "--models-max", "1",
            "--host", HOST, "--port", str(p2), *SAME_SERVER,
        ],
    }  # fmt: skip
    urls = dict(zip(argvs, (f"http://{HOST}:{p1}", f"http://{HOST}:{p2}"), strict=True))
    times: dict[str, list[float]] = {label: [] for label in argvs}
    names: dict[str, list[str]] = {}
    async with _session() as session:
        with contextlib.ExitStack() as stack:
            for label, argv in argvs.items():
                proc = stack.enter_context(launched(argv, work / f"swap-{label.split()[0]}.log"))
                await wait_until(lambda url=urls[label]: healthy(session, url), proc)
                async with session.get(f"{urls[label]}/v1/models") as r:
                    ids = sorted(m["id"] for m in (await r.json())["data"])
                names[label] = [next(i for i in ids if f"swap-{x}" in i) for x in "ab"]
                # the first load is not a swap: get model a loaded and answering
                await wait_until(
                    lambda u=urls[label], m=names[label][0]: answered(session, u, m), proc
                )
            labels = list(argvs)
            for r in range(rounds):
                for label in labels[r % 2 :] + labels[: r % 2]:
                    wanted = names[label][(r + 1) % 2]  # the one that is not loaded
                    t0 = time.perf_counter()
                    await one_token(session, urls[label], wanted)
                    times[label].append(1000 * (time.perf_counter() - t0))
    ours, theirs = times[labels[0]], times[labels[1]]
    rows = [[label, fmt(spread(v), " ms", 0)] for label, v in times.items()]
    rows.append(
        ["ratio llamactl / llama.cpp router (per round)", fmt(ratios(theirs, ours), "x", 2)]
    )
    return {
        "title": "Model swap time",
        "commands": {label: cmdline(argv) for label, argv in argvs.items()},
        "header": ["server", "request for the unloaded model -> answer"],
        "rows": rows,
        "raw": times,
        "notes": [
            f"{rounds} interleaved rounds; each request is a one-token chat completion naming "
            "the model that is not loaded (two names for the demo model), so it waits for the "
            "loaded one to stop and the other to load. Config: `" + str(config.name) + "` with "
            "`max_loaded = 1` and one `[models.*]` table per file.",
            "The ratio is computed per round: below 1 means llamactl swaps faster.",
        ],
    }
