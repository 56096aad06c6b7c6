"""The executables a build needs: where they are and which version.

Each tool is looked for in the order the build will use it, so that what
``llamactl detect`` reports is what ``llamactl build`` runs: the cmake and
ninja installed next to this Python (the ``cmake``/``ninja`` wheels llamactl
depends on) before ``$PATH``; ``$CC``/``$CXX`` before the usual compiler
names, as CMake itself does; ``$CUDA_HOME`` before ``$PATH`` for nvcc.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from buildtools._runner import Runner
from buildtools.hardware._model import Tool

__all__ = ["find_tool", "parse_version", "probe_nvcc", "probe_toolchains"]

#: compiler names tried when $CC / $CXX are unset, in CMake's order of preference
_CC_NAMES = ("cc", "gcc", "clang")
_CXX_NAMES = ("c++", "g++", "clang++")
#: where CUDA installers put nvcc when it is not on PATH
_NVCC_DIRS = ("usr/local/cuda/bin", "opt/cuda/bin")

_VERSION_WORD = re.compile(r"\bversion\s+v?(\d+(?:\.\d+)+)", re.IGNORECASE)
_NVCC_RELEASE = re.compile(r"\brelease\s+(\d+\.\d+)")
_ANY_VERSION = re.compile(r"\bv?(\d+\.\d+(?:\.\d+)*)")


def parse_version(text: str) -> str | None:
    """The version in a ``--version`` banner, or ``None``.

    Banners differ: ``cmake version 3.31.6``, ``cc (Debian 12.2.0-14)
    12.2.0`` (gcc puts the packager's version first, the real one last),
    ``Cuda compilation tools, release 12.4, V12.4.131``, ``1.11.1`` (ninja).
    """
    if match := _NVCC_RELEASE.search(text):
        return match.group(1)
    if match := _VERSION_WORD.search(text):
        return match.group(1)
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    found = _ANY_VERSION.findall(first_line)
    return found[-1] if found else None


def find_tool(
    name: str,
    runner: Runner,
    env: Mapping[str, str],
    *,
    candidates: Sequence[str],
    dirs: Sequence[Path] = (),
    fallback_dirs: Sequence[Path] = (),
    version_args: Sequence[str] = ("--version",),
    hint: str = "",
) -> Tool:
    """The first of ``candidates`` found in ``dirs``, on ``$PATH``, then in ``fallback_dirs``.

    A candidate may be an absolute path. Never raises: a tool that exists but
    will not report its version is still found, with the reason.
    """
    search_path = env.get("PATH", os.defpath)
    path = _locate(candidates, dirs, search_path) or _locate(candidates, fallback_dirs, None)
    if path is None:
        tried = ", ".join(candidates)
        return Tool(name=name, reason=f"not found (tried {tried})" + (f": {hint}" if hint else ""))
    result = runner([path, *version_args], timeout=15)
    version = parse_version(result.stdout + "\n" + result.stderr) if result.ok else None
    if version is None:
        detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        return Tool(name=name, path=path, reason=f"version unknown: {detail[0]}")
    return Tool(name=name, path=path, version=version)


def _locate(candidates: Sequence[str], dirs: Sequence[Path], search_path: str | None) -> str | None:
    for candidate in candidates:
        if Path(candidate).is_absolute():
            if _is_executable(Path(candidate)):
                return candidate
            continue
        for directory in dirs:
            if _is_executable(directory / candidate):
                return str(directory / candidate)
        if search_path and (found := shutil.which(candidate, path=search_path)):
            return found
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _compiler(
    name: str, var: str, defaults: Sequence[str], runner: Runner, env: Mapping[str, str]
) -> Tool:
    """$CC/$CXX win when set, exactly as CMake would pick them.

    The variable may carry flags or a launcher (``CC="ccache gcc"``); the
    compiler is its last word that does not start with ``-``.
    """
    if chosen := env.get(var, "").strip():
        try:
            split = shlex.split(chosen)
        except ValueError:  # unbalanced quotes: CMake would not parse it either
            split = chosen.split()
        words = [w for w in split if not w.startswith("-")]
        if words:
            tool = find_tool(name, runner, env, candidates=[words[-1]])
            if not tool.found:
                return Tool(name=name, reason=f"${var}={chosen!r} is not an executable")
            return tool
    hint = "install gcc/g++ or clang (e.g. apt install build-essential)"
    return find_tool(name, runner, env, candidates=defaults, hint=hint)


def probe_nvcc(runner: Runner, env: Mapping[str, str], *, root: Path = Path("/")) -> Tool:
    """The CUDA compiler the build would use.

    ``$CUDA_HOME``/``$CUDA_PATH`` first (the user's explicit choice, and what
    CMake's FindCUDAToolkit honours), then ``$PATH``, then the installers'
    default ``/usr/local/cuda/bin``, which is often left off ``$PATH``.
    """
    homes = [env[var] for var in ("CUDA_HOME", "CUDA_PATH") if env.get(var)]
    explicit = [str(Path(home) / "bin" / "nvcc") for home in homes]
    tool = find_tool(
        "nvcc",
        runner,
        env,
        candidates=[*explicit, "nvcc"],
        fallback_dirs=[root / d for d in _NVCC_DIRS],
    )
    if tool.found:
        return tool
    return Tool(
        name="nvcc",
        reason="not found in $CUDA_HOME/bin, on $PATH or in /usr/local/cuda/bin: "
        "install the CUDA toolkit to build the CUDA backend",
    )


def probe_toolchains(
    runner: Runner,
    env: Mapping[str, str],
    *,
    python: str = sys.executable,
    root: Path = Path("/"),
) -> dict[str, Tool]:
    """cmake, ninja, cc, cxx, nvcc, ccache and glslc, keyed by those names.

    ``python`` is the interpreter whose scripts directory holds the pip-installed
    cmake and ninja; it is not resolved through symlinks because a venv's
    ``bin/python`` links to the base interpreter while its tools stay in the venv.
    """
    beside_python = [Path(python).parent]
    vulkan_sdk = [Path(env["VULKAN_SDK"]) / "bin"] if env.get("VULKAN_SDK") else []
    return {
        "cmake": find_tool(
            "cmake",
            runner,
            env,
            candidates=["cmake"],
            dirs=beside_python,
            hint="pip install cmake",
        ),
        "ninja": find_tool(
            "ninja",
            runner,
            env,
            candidates=["ninja"],
            dirs=beside_python,
            hint="pip install ninja",
        ),
        "cc": _compiler("cc", "CC", _CC_NAMES, runner, env),
        "cxx": _compiler("cxx", "CXX", _CXX_NAMES, runner, env),
        "nvcc": probe_nvcc(runner, env, root=root),
        "ccache": find_tool(
            "ccache",
            runner,
            env,
            candidates=["ccache", "sccache"],
            hint="optional: makes rebuilds fast",
        ),
        "glslc": find_tool(
            "glslc",
            runner,
            env,
            candidates=["glslc"],
            dirs=vulkan_sdk,
            hint="needed for Vulkan builds (shaderc, e.g. apt install glslc)",
        ),
    }
