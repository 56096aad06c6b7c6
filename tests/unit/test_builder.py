"""Toolchain checks happen before anything runs, with what to install."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from buildtools.builder import _require_tools
from buildtools.errors import ToolchainError
from buildtools.hardware._model import Tool
from buildtools.plan import BuildPlan
from buildtools.source import SourceTree
from buildtools.verify import VerifyResult
from tests.unit import profiles as p


def test_complete_toolchain_passes() -> None:
    assert _require_tools(p.AVX2_DESKTOP) == ("/usr/bin/cmake", "/usr/bin/ninja")


@pytest.mark.parametrize(
    ("tools", "message", "hint"),
    [
        ({"cxx": Tool(name="cxx", reason="not found")}, "no C/C++ compiler", "build-essential"),
        (
            {"cmake": Tool(name="cmake", reason="not found")},
            "cmake was not found",
            "pip install cmake",
        ),
        (
            {"cmake": Tool(name="cmake", path="/x/cmake", version="3.10.2")},
            "too old",
            "pip install -U cmake",
        ),
        (
            {"ninja": Tool(name="ninja", reason="not found")},
            "ninja was not found",
            "pip install ninja",
        ),
    ],
)
def test_missing_or_old_tools_are_named_with_a_fix(
    tools: dict[str, Tool], message: str, hint: str
) -> None:
    profile = replace(p.AVX2_DESKTOP, toolchains={**p.AVX2_DESKTOP.toolchains, **tools})
    with pytest.raises(ToolchainError, match=re.escape(message)) as info:
        _require_tools(profile)
    assert info.value.hint is not None and hint in info.value.hint


class FakeToolchain:
    """Stands in for the compile and the verification run; records what each was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, verify: Callable[..., VerifyResult]):
        from buildtools import builder

        self.compiled: list[dict[str, str]] = []
        self.verified: list[dict[str, object]] = []
        self._verify = verify
        monkeypatch.setattr(builder, "_compile", self.compile)
        monkeypatch.setattr(builder, "verify_server", self.verify)
        monkeypatch.setattr(builder, "verify_rpc", self.verify_rpc)
        self.rpc_verified: list[Path] = []
        monkeypatch.setattr(
            builder, "read_version", lambda b: {"build": "11312", "commit": "0c1e570"}
        )

    def compile(self, plan: BuildPlan, source: object, *args: object, **kwargs: object) -> None:
        self.compiled.append(dict(plan.cmake_defines))
        work = args[1]
        assert isinstance(work, Path)
        (work / "bin").mkdir(parents=True, exist_ok=True)
        for target in plan.targets:
            (work / "bin" / target).write_text("binary")

    def verify_rpc(self, worker: Path, server: Path, model: Path, **kwargs: object) -> object:
        from buildtools.verify import RpcVerifyResult

        self.rpc_verified.append(worker)
        return RpcVerifyResult(
            ok=True, protocol="7.0.0", buffers=("RPC0[127.0.0.1:1]",), completion_tokens=4
        )

    def verify(self, binary: Path, model: Path, **kwargs: object) -> VerifyResult:
        self.verified.append(kwargs)
        return self._verify(self.compiled[-1], **kwargs)


def _answered(**changes: object) -> VerifyResult:
    result = VerifyResult(
        ok=True, seconds_to_ready=0.1, completion_tokens=4, text="hi", exit_code=0
    )
    return replace(result, **changes)


def _source(tmp_path: Path) -> SourceTree:
    return SourceTree(path=tmp_path, origin="directory", source_id="s", build_number=1, commit="c")


def test_sigill_in_verification_rebuilds_without_the_top_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binary that dies with SIGILL is rebuilt with fewer extensions, and says so."""
    from buildtools import builder
    from buildtools.errors import VerificationError
    from buildtools.plan import BuildOptions

    def verify(defines: dict[str, str], **kwargs: object) -> VerifyResult:
        if defines.get("GGML_AVX512_BF16") == "ON":
            raise VerificationError("died with SIGILL", returncode=-4)
        return _answered()

    fake = FakeToolchain(monkeypatch, verify)
    compiled = fake.compiled
    result = builder.build(
        p.AVX512_SERVER,
        BuildOptions(),
        _source(tmp_path),
        model=tmp_path / "m.gguf",
        home=tmp_path / "home",
    )
    assert [(c["GGML_AMX_INT8"], c["GGML_AVX512_BF16"]) for c in compiled] == [
        ("ON", "ON"),
        ("OFF", "ON"),
        ("OFF", "OFF"),
    ]
    assert compiled[-1]["GGML_AVX512"] == "ON", "only the failing level is given up"
    assert set(result.turned_off) == {
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "avx512_vbmi",
        "avx512_vnni",
        "avx512_bf16",
    }
    assert "SIGILL" in result.turned_off["avx512_bf16"]
    assert result.build.verified and result.build.manifest["turned_off"] == result.turned_off
    assert result.plan.reasons["GGML_AVX512_BF16"].startswith("avx512_bf16 turned off")
    assert len(fake.rpc_verified) == 1, "RPC is verified once, on the build that is kept"
    assert result.build.rpc_protocol == "7.0.0"
    assert result.build.rpc_worker.name == "ggml-rpc-server"


def test_a_cuda_build_must_offload_to_be_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verification run of a CUDA build is told to expect the GPU, and what it saw is kept."""
    from buildtools import builder
    from buildtools.plan import BuildOptions

    fake = FakeToolchain(monkeypatch, lambda defines, **kw: _answered(gpu_layers="31/31"))
    result = builder.build(
        p.CUDA_BOX,
        BuildOptions(),
        _source(tmp_path),
        model=tmp_path / "m.gguf",
        home=tmp_path / "home",
    )
    assert fake.compiled[0]["GGML_CUDA"] == "ON"
    assert fake.verified[0]["gpu"] == "CUDA"
    assert result.build.manifest["verified"]["gpu_layers"] == "31/31"

    cpu = FakeToolchain(monkeypatch, lambda defines, **kw: _answered())
    builder.build(
        p.AVX2_DESKTOP,
        BuildOptions(),
        _source(tmp_path),
        model=tmp_path / "m.gguf",
        home=tmp_path / "cpu-home",
    )
    assert cpu.verified[0].get("gpu") is None


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (
            "load_tensors: offloading 30 repeating layers to GPU\n"
            "load_tensors: offloaded 31/31 layers to GPU\n",
            (31, 31),
        ),
        ("load_tensors: offloaded 0/31 layers to GPU\n", (0, 31)),
        ("load_tensors: CPU_Mapped model buffer size = 93.8 MiB\n", None),
    ],
)
def test_offload_is_read_from_the_server_log(log: str, expected: tuple[int, int] | None) -> None:
    from buildtools.verify import gpu_offload

    assert gpu_offload(log) == expected


def test_shared_build_ships_each_library_once_under_its_soname(tmp_path: Path) -> None:
    from buildtools.builder import _runtime_libraries

    (tmp_path / "libllama.so.0.5.0").write_text("lib")
    (tmp_path / "libllama.so.0").symlink_to("libllama.so.0.5.0")
    (tmp_path / "libllama.so").symlink_to("libllama.so.0")
    (tmp_path / "libggml-cpu-zen4.so").write_text("module")
    assert [p.name for p in _runtime_libraries(tmp_path)] == [
        "libggml-cpu-zen4.so",
        "libllama.so.0",
    ]


class _LogWatchingChild:
    """A stand-in compile whose output checks the log on disk before each next line.

    A reader who runs ``tail -f`` on the log sees each line as soon as the
    compile printed it; so before printing line N+1 the fake child reads the
    log file (as that reader would) and records whether line N is there.
    """

    LINES = (
        "[1/3] Building CXX object a.o\n",
        "warning: x\n",
        "[2/3] Building b.o\n",
        "[3/3] Linking\n",
    )

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.pid = 4242
        self.returncode: int | None = None
        self.seen_on_disk: list[bool] = []
        self.stdout = self._lines()

    def _lines(self) -> Iterator[str]:
        for number, line in enumerate(self.LINES):
            if number:
                self.seen_on_disk.append(self.LINES[number - 1] in self.log_path.read_text())
            yield line
        self.seen_on_disk.append(self.LINES[-1] in self.log_path.read_text())

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0
        return 0

    def poll(self) -> int | None:
        return self.returncode


def test_the_build_log_is_on_disk_line_by_line_as_the_progress_bar_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from buildtools.builder import BuildProgress, _run_logged

    log_path = tmp_path / "llamactl-build.log"
    child = _LogWatchingChild(log_path)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: child)
    shown: list[tuple[BuildProgress, bool]] = []

    def on_progress(progress: BuildProgress) -> None:  # the progress bar: is its line logged?
        shown.append((progress, progress.line in log_path.read_text()))

    _run_logged(["ninja"], log_path, stage="compile", env={}, on_progress=on_progress)
    assert child.seen_on_disk == [True] * len(child.LINES)
    assert [(p.done, p.total) for p, _ in shown] == [(1, 3), (0, 0), (2, 3), (3, 3)]
    assert all(logged for _, logged in shown)
