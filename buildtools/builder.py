"""Configure, compile, verify and publish one build.

The compile is the slowest thing llamactl does (8-10 minutes on two cores),
so: only the needed targets are built, with Ninja and ccache; the cmake tree
is kept per cache key so an interrupted build resumes; and a plan that was
already built, verified and published returns at once from the cache.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from buildtools import paths
from buildtools._runner import capture
from buildtools.cache import BuildCache, CachedBuild
from buildtools.cancel import CancelToken
from buildtools.errors import BuildError, ToolchainError, VerificationError
from buildtools.hardware._model import HardwareProfile
from buildtools.plan import BuildOptions, BuildPlan, make_plan, sigill_fallback
from buildtools.source import SourceTree
from buildtools.verify import VerifyResult, log_tail, read_version, verify_rpc, verify_server

__all__ = ["BuildProgress", "BuildResult", "build", "compiler_identity"]

_NINJA_STATUS = re.compile(r"^\[(\d+)/(\d+)\]")
_MIN_CMAKE = (3, 14)
_MIN_FREE_BYTES = 2 << 30
_TAIL_LINES = 30
#: how many times a build is retried with fewer CPU features after SIGILL
_MAX_FALLBACKS = 3


@dataclass(frozen=True)
class BuildProgress:
    """One step of progress: ``stage`` is waiting (for another build of the same plan),
    configure, compile, verify or done."""

    stage: str
    done: int = 0
    total: int = 0
    line: str = ""


ProgressCallback = Callable[[BuildProgress], None]


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    build: CachedBuild
    plan: BuildPlan
    cached: bool
    seconds: float
    turned_off: dict[str, str] = field(default_factory=dict)
    """CPU features given up after failed verification, with the failure."""

    def to_json(self) -> dict[str, Any]:
        m = self.build.manifest
        return {
            "key": self.build.key,
            "binary": str(self.build.binary),
            "version": self.build.version,
            "backend": self.build.backend,
            "cmake_defines": m.get("plan", {}).get("cmake_defines", {}),
            "cached": self.cached,
            "verified": self.build.verified,
            "verification": m.get("verified", {}),
            "seconds": round(self.seconds, 2),
            "turned_off": self.turned_off,
            "log": m.get("log"),
        }


def compiler_identity(profile: HardwareProfile, plan: BuildPlan) -> str:
    """What part of the cache key says which compilers produced the build.

    Paths are resolved: ``/usr/bin/cc`` and ``/usr/bin/gcc`` are usually the
    same compiler, and a wheel build (which may find the other name) must hit
    the same cache entry as ``llamactl build``.
    """
    parts = []
    for name in ("cc", "cxx"):
        tool = profile.tool(name)
        path = os.path.realpath(tool.path) if tool.path else None
        parts.append(f"{name}={path}@{tool.version}")
    if plan.cmake_defines.get("GGML_CUDA") == "ON":
        parts.append(f"nvcc@{profile.tool('nvcc').version}")
    parts.append(platform.machine())
    return ";".join(parts)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    nums = re.findall(r"\d+", text or "")
    return tuple(int(n) for n in nums[:3])


def _require_tools(profile: HardwareProfile) -> tuple[str, str]:
    cmake = profile.tool("cmake")
    ninja = profile.tool("ninja")
    cxx = profile.tool("cxx")
    if not cmake.path:
        raise ToolchainError(
            "cmake was not found", hint="pip install cmake (or install it with your OS)"
        )
    if _version_tuple(cmake.version) and _version_tuple(cmake.version) < _MIN_CMAKE:
        raise ToolchainError(
            f"cmake {cmake.version} is too old; llama.cpp needs "
            f"{'.'.join(map(str, _MIN_CMAKE))} or newer",
            hint="pip install -U cmake",
        )
    if not ninja.path:
        raise ToolchainError("ninja was not found", hint="pip install ninja")
    if not cxx.path:
        raise ToolchainError(
            "no C/C++ compiler was found",
            hint="install one (Debian/Ubuntu: apt install build-essential; "
            "macOS: xcode-select --install)",
        )
    return cmake.path, ninja.path


def _run_logged(
    argv: Sequence[str],
    log_path: Path,
    *,
    stage: str,
    env: dict[str, str],
    on_progress: ProgressCallback | None,
    cancel: CancelToken | None = None,
) -> None:
    """Run one build step, appending its output to the log and reporting progress.

    Output is read line by line as it comes so the progress bar follows the
    real compile; on any interruption the child is stopped before re-raising.
    The log is line-buffered: each line is on disk before the progress bar
    shows it, so ``tail -f`` of the log follows a compile as it goes (a
    block-buffered log showed nothing for minutes of a cold ``-j 1`` build).
    """
    with log_path.open("a", encoding="utf-8", errors="replace", buffering=1) as log:
        log.write(f"$ {' '.join(argv)}\n")
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,
        )
        # a cancel kills the step's group at once: its output ends, the loop below with it
        stop_on_cancel = (
            cancel.on_cancel(lambda: _signal_group(proc, signal.SIGTERM))
            if cancel is not None
            else None
        )
        try:
            for line in proc.stdout or ():
                log.write(line)
                if on_progress is not None:
                    m = _NINJA_STATUS.match(line)
                    done, total = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
                    on_progress(BuildProgress(stage, done, total, line.rstrip()))
            code = proc.wait()
        finally:
            if stop_on_cancel is not None:
                stop_on_cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    if cancel is not None:
        cancel.raise_if_cancelled()
    if code != 0:
        raise BuildError(
            f"the {stage} step failed",
            command=argv,
            returncode=code,
            log_tail=log_tail(log_path, _TAIL_LINES),
            log_path=str(log_path),
            hint="read the log above; `llamactl build --force` retries from a clean build tree"
            if stage == "configure"
            else "fix the cause shown above and run `llamactl build` again "
            "(finished objects are reused)",
        )


def _waiting(on_progress: ProgressCallback | None) -> None:
    if on_progress:
        on_progress(BuildProgress("waiting", line="another build of this plan runs"))


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _compile(
    plan: BuildPlan,
    source: SourceTree,
    profile: HardwareProfile,
    work: Path,
    log_path: Path,
    *,
    jobs: int,
    on_progress: ProgressCallback | None,
    home: Path,
    cancel: CancelToken | None = None,
) -> None:
    cmake, ninja = _require_tools(profile)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < _MIN_FREE_BYTES:
        raise BuildError(
            f"only {free / 2**30:.1f} GiB free at {work}; a build needs about 2 GiB",
            hint="free some disk space, or point LLAMACTL_HOME at a larger disk",
        )
    env = dict(os.environ)
    # ccache keys on paths; relative to the cache home, trees of different
    # keys share compiled objects whenever the flags agree.
    env.setdefault("CCACHE_BASEDIR", str(home))
    env.setdefault("NINJA_STATUS", "[%f/%t] ")
    defines = {**plan.cmake_defines, **source.cmake_version_defines()}
    configure = [
        cmake,
        "-S",
        str(source.path),
        "-B",
        str(work),
        "-G",
        "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={ninja}",
        *(f"-D{k}={v}" for k, v in sorted(defines.items())),
    ]
    if profile.tool("cc").path:
        configure.append(f"-DCMAKE_C_COMPILER={profile.tool('cc').path}")
    if profile.tool("cxx").path:
        configure.append(f"-DCMAKE_CXX_COMPILER={profile.tool('cxx').path}")
    if on_progress:
        on_progress(BuildProgress("configure"))
    _run_logged(
        configure, log_path, stage="configure", env=env, on_progress=on_progress, cancel=cancel
    )
    targets = [*plan.targets, *_backend_modules(ninja, work, plan)]
    compile_cmd = [cmake, "--build", str(work), "--target", *targets, "-j", str(jobs)]
    _run_logged(
        compile_cmd, log_path, stage="compile", env=env, on_progress=on_progress, cancel=cancel
    )


_MODULE_TARGET = re.compile(
    r"^(ggml-cpu-[A-Za-z0-9_.]+|ggml-(?:cuda|vulkan|opencl|metal|blas)): phony"
)


def _backend_modules(ninja: str, work: Path, plan: BuildPlan) -> list[str]:
    """With GGML_BACKEND_DL the backends are modules llama-server loads at run
    time, so building llama-server alone would not build them: list them from
    the configured tree (one per CPU variant under GGML_CPU_ALL_VARIANTS)."""
    if plan.cmake_defines.get("GGML_BACKEND_DL") != "ON":
        return []
    listed = capture([ninja, "-C", str(work), "-t", "targets", "all"], timeout=60)
    return sorted(
        {m.group(1) for line in listed.stdout.splitlines() if (m := _MODULE_TARGET.match(line))}
    )


_LOADED_CPU = re.compile(r"loaded CPU backend from (\S+)")


def _verify_portable(
    binary: Path, model: Path, staged: Path, gpu: str | None
) -> tuple[VerifyResult, dict[str, str]]:
    """Verify a backend-DL build: if the CPU variant ggml picks for this
    machine dies with SIGILL, drop that variant (the next best is loaded on
    the next run) and verify again. Returns what was dropped and why."""
    dropped: dict[str, str] = {}
    log_path = staged / "verify.log"
    while True:
        try:
            # verbose logging is what makes ggml say which CPU variant it loaded
            result = verify_server(
                binary, model, log_path=log_path, extra_args=("-lv", "4"), gpu=gpu
            )
        except VerificationError as exc:
            found = (
                _LOADED_CPU.findall(log_path.read_text(errors="replace"))
                if log_path.exists()
                else []
            )
            if exc.returncode != -4 or not found:
                raise
            variant = Path(found[-1])
            if not variant.is_file():
                raise
            variant.unlink()
            dropped[variant.name] = exc.message
        else:
            return result, dropped


def _picked_variant(log_path: Path) -> str | None:
    """Which CPU variant a backend-DL build loaded during verification."""
    try:
        found = _LOADED_CPU.findall(log_path.read_text(errors="replace"))
    except OSError:
        return None
    return Path(found[-1]).name if found else None


def _configured_from(work: Path) -> Path | None:
    """The source tree an existing cmake build tree was configured from.

    Keys are content addresses, so the same tree moved elsewhere maps to the
    same work directory; cmake refuses to reuse a tree configured from another
    path, so such a tree is started afresh instead.
    """
    try:
        for line in (work / "CMakeCache.txt").read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_HOME_DIRECTORY:INTERNAL="):
                return Path(line.partition("=")[2])
    except OSError:
        return None
    return None


def _stage(work: Path, staged: Path, targets: Sequence[str]) -> None:
    """Copy the binaries (and shared libraries of a shared build) out of the tree."""
    out = work / "bin"
    (staged / "bin").mkdir(parents=True)
    for target in targets:
        src = out / target
        if not src.is_file():
            raise BuildError(f"the compile finished but {src} is missing")
        shutil.copy2(src, staged / "bin" / target)
    for lib in _runtime_libraries(out):
        shutil.copy2(lib, staged / "bin" / lib.name, follow_symlinks=True)


def _runtime_libraries(out: Path) -> list[Path]:
    """The shared libraries a shared build needs at run time, once each.

    A shared llama.cpp build leaves ``libllama.so -> libllama.so.0 ->
    libllama.so.0.5.0``; binaries load the soname (``.so.0``), so that name
    is kept with the real content, and the development link and the fully
    versioned file are left out instead of shipping three copies. Modules
    without versions (the CPU variants) are kept as they are.
    """
    libs = [*out.glob("*.so*"), *out.glob("*.dylib")]
    link_targets = {lib.resolve() for lib in libs if lib.is_symlink()}
    keep = []
    for lib in libs:
        if lib.is_symlink():
            if not lib.name.endswith((".so", ".dylib")):  # a soname link
                keep.append(lib)
        elif lib.resolve() not in link_targets:
            keep.append(lib)
    return sorted(keep)


def build(
    profile: HardwareProfile,
    options: BuildOptions,
    source: SourceTree,
    *,
    model: Path,
    home: Path | None = None,
    jobs: int | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> BuildResult:
    """Build (or fetch from the cache) a verified server for ``options``.

    If the verification run dies with SIGILL, the build is redone with the
    highest remaining CPU extension turned off, and the result says so.
    ``cancel`` stops it (waiting for the lock, or compiling) with
    :class:`~buildtools.errors.BuildCancelled`; the build tree is kept.
    """
    home = home or paths.home()
    cache = BuildCache(home)
    started = time.monotonic()
    turned_off: dict[str, str] = {}
    for _attempt in range(_MAX_FALLBACKS + 1):
        plan = make_plan(profile, options)
        compiler = compiler_identity(profile, plan)
        key = plan.cache_key(source_id=source.source_id, compiler=compiler)
        with cache.lock(key, cancel=cancel, on_wait=partial(_waiting, on_progress)):
            if not force and (hit := cache.get(key)) is not None:
                if on_progress:
                    on_progress(BuildProgress("done", line="cache hit"))
                return BuildResult(
                    build=hit,
                    plan=plan,
                    cached=True,
                    seconds=time.monotonic() - started,
                    turned_off=turned_off,
                )
            work = cache.work_dir(key)
            if work.exists() and (force or _configured_from(work) not in {None, source.path}):
                shutil.rmtree(work)
            work.mkdir(parents=True, exist_ok=True)
            log_path = work / "llamactl-build.log"
            log_path.write_text("")
            compile_started = time.monotonic()
            _compile(
                plan,
                source,
                profile,
                work,
                log_path,
                jobs=jobs or os.cpu_count() or 2,
                on_progress=on_progress,
                home=home,
                cancel=cancel,
            )
            compile_seconds = time.monotonic() - compile_started
            staged = cache.staging_dir(key)
            shutil.rmtree(staged, ignore_errors=True)
            try:
                _stage(work, staged, plan.targets)
                if on_progress:
                    on_progress(
                        BuildProgress("verify", line="running the built server on the demo model")
                    )
                gpu = "CUDA" if plan.cmake_defines.get("GGML_CUDA") == "ON" else None
                try:
                    if plan.cmake_defines.get("GGML_BACKEND_DL") == "ON":
                        verified, dropped = _verify_portable(
                            staged / "bin" / "llama-server", model, staged, gpu
                        )
                        turned_off.update(dropped)
                    else:
                        verified = verify_server(
                            staged / "bin" / "llama-server",
                            model,
                            log_path=staged / "verify.log",
                            gpu=gpu,
                        )
                except VerificationError as exc:
                    fallback = sigill_fallback(plan, exc.returncode)
                    if fallback is None:
                        raise
                    turned_off.update(dict.fromkeys(fallback, exc.message))
                    options = replace(
                        options, disabled_features=options.disabled_features | fallback
                    )
                    continue
                rpc = (
                    verify_rpc(
                        staged / "bin" / "ggml-rpc-server",
                        staged / "bin" / "llama-server",
                        model,
                        log_dir=staged,
                    ).to_json()
                    if "ggml-rpc-server" in plan.targets
                    else None
                )
                manifest = {
                    "key": key,
                    "created": time.time(),
                    "version": f"b{v['build']} ({v['commit']})"
                    if (v := read_version(staged / "bin" / "llama-server"))["build"] != "unknown"
                    else "unknown",
                    "source": {
                        "origin": source.origin,
                        "id": source.source_id,
                        "path": str(source.path),
                        "commit": source.commit,
                    },
                    "plan": plan.to_json(source_id=source.source_id, compiler=compiler),
                    "compiler": compiler,
                    "compile_seconds": round(compile_seconds, 1),
                    "verified": verified.to_json(),
                    "rpc": rpc,
                    "turned_off": turned_off,
                    "cpu_variant": _picked_variant(staged / "verify.log"),
                    "log": str(log_path),
                }
                published = cache.publish(key, staged, manifest)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            if on_progress:
                on_progress(BuildProgress("done", line="verified and cached"))
            return BuildResult(
                build=published,
                plan=plan,
                cached=False,
                seconds=time.monotonic() - started,
                turned_off=turned_off,
            )
    raise VerificationError(
        f"no build passed verification after turning off {', '.join(turned_off) or 'nothing'}",
        hint="report this with the output of `llamactl detect --json`",
    )
