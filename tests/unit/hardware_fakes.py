"""Fake machines for the hardware probes: runners, /proc trees, NVML, executables."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buildtools._runner import Completed
from buildtools.hardware import PlatformInfo

LINUX_X86 = PlatformInfo(system="linux", machine="x86_64")
LINUX_ARM = PlatformInfo(system="linux", machine="aarch64")
MAC_ARM = PlatformInfo(system="darwin", machine="arm64")
MAC_X86 = PlatformInfo(system="darwin", machine="x86_64")
WINDOWS = PlatformInfo(system="windows", machine="amd64")

FAKE_PYTHON = "/fake/venv/bin/python"

Answer = Completed | str | Callable[[Sequence[str]], Completed]


@dataclass
class FakeRunner:
    """Answers by ``"name arg..."`` (name = basename of argv[0]), then by name alone.

    A ``str`` answer is stdout with exit status 0; anything unanswered behaves
    like a program that is not installed (127).
    """

    answers: Mapping[str, Answer] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def __call__(
        self,
        args: Sequence[str],
        *,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        argv = tuple(args)
        self.calls.append(argv)
        name = Path(argv[0]).name
        if name.startswith("python"):  # python3, python3.11: whatever sys.executable is
            name = "python"
        answer = self.answers.get(" ".join([name, *argv[1:]]), self.answers.get(name))
        if answer is None:
            return Completed(argv, 127, "", f"{name}: not found")
        if isinstance(answer, str):
            return Completed(argv, 0, answer, "")
        if isinstance(answer, Completed):
            return Completed(argv, answer.returncode, answer.stdout, answer.stderr)
        return answer(argv)

    def ran(self, name: str) -> bool:
        return any(Path(call[0]).name.startswith(name) for call in self.calls)


def xsave(xcr0: int | None = 0xE7, *, osxsave: bool = True, amx_errno: int | None = None) -> str:
    """What the XCR0 child prints."""
    doc: dict[str, Any] = {"osxsave": osxsave}
    if xcr0 is not None:
        doc["xcr0"] = xcr0
    if amx_errno is not None:
        doc["amx_errno"] = amx_errno
    return json.dumps(doc)


def proc_tree(root: Path, cpuinfo: str) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(cpuinfo)
    return root


def x86_cpuinfo(flags: str, *, model: str = "Fake CPU", processors: int = 2) -> str:
    block = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
        f"model name\t: {model}\nflags\t\t: {flags}\n"
    )
    return "\n".join(block.format(n=n) for n in range(processors))


def executable(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def touch(root: Path, relative: str, text: str = "") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- NVML -------------------------------------------------------------------


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str | bytes = "NVIDIA H100 80GB HBM3"
    total: int = 80 << 30
    free: int = 79 << 30
    capability: tuple[int, int] = (9, 0)
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"


@dataclass
class _Memory:
    total: int
    free: int
    used: int = 0


@dataclass
class FakeNvml:
    """The slice of pynvml the CUDA probe uses, under pynvml's camelCase names."""

    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    driver: str = "550.54.14"
    cuda_driver: int = 12040
    init_error: Exception | None = None
    query_error: Exception | None = None
    shut_down: bool = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda_driver

    def nvmlDeviceGetCount(self) -> int:
        if self.query_error:
            raise self.query_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> _Memory:
        return _Memory(total=handle.total, free=handle.free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeGpu) -> tuple[int, int]:
        return handle.capability

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid
