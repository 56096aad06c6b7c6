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
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from buildtools._wheelfile import relabel
from buildtools.errors import BuildError, LlamactlError

if TYPE_CHECKING:  # `serve` imports this module for bundled_server(): keep it light
    from buildtools.builder import BuildProgress

__all__ = ["BUNDLED_DIR", "build_wheel", "bundled_server", "main", "project_root", "repair"]

#: where an installed wheel keeps its server
BUNDLED_DIR = Path(__file__).resolve().parent / "bin"
MANIFEST = "llamactl-build.json"


def bundled_server() -> Path | None:
    """The llama-server shipped inside this installed wheel, if any."""
    binary = BUNDLED_DIR / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


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
        _say(f"error: {exc.message}")
        if exc.hint:
            _say(f"hint: {exc.hint}")
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
    before = set(out.glob("llamactl-*.whl"))
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
    made = sorted(set(out.glob("llamactl-*.whl")) - before) or sorted(out.glob("llamactl-*.whl"))
    if not made:
        raise BuildError("pip wheel succeeded but left no llamactl wheel", command=argv)
    wheel = max(made, key=lambda p: p.stat().st_mtime)
    return relabel(wheel, _label(wheel))


def _label(wheel: Path) -> str:
    """``cpu``, ``cpu.portable``, ``cuda130``... from the manifest the wheel carries."""
    with zipfile.ZipFile(wheel) as zf:
        manifest = json.loads(zf.read(f"buildtools/bin/{MANIFEST}"))
    plan = manifest.get("plan", {})
    backend = str(plan.get("backend", "cpu"))
    if backend == "cuda":
        nvcc = re.search(r"nvcc@(\d+)\.(\d+)", str(manifest.get("compiler", "")))
        backend = f"cu{nvcc.group(1)}{nvcc.group(2)}" if nvcc else "cuda"
    portable = plan.get("cmake_defines", {}).get("GGML_BACKEND_DL") == "ON"
    return f"{backend}.portable" if portable else backend


def repair(wheel: Path, out: Path) -> Path:
    """``auditwheel repair`` for wheels meant to be shared (manylinux tags)."""
    if shutil.which("auditwheel") is None and importlib.util.find_spec("auditwheel") is None:
        raise BuildError(
            "auditwheel is not installed", hint="pip install auditwheel (needs patchelf)"
        )
    argv = [sys.executable, "-m", "auditwheel", "repair", "-w", str(out), str(wheel)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(
            "auditwheel repair failed",
            command=argv,
            returncode=done.returncode,
            log_tail=(done.stderr or done.stdout)[-3000:],
        )
    repaired = [p for p in out.glob("*.whl") if "manylinux" in p.name]
    return max(repaired, key=lambda p: p.stat().st_mtime)
