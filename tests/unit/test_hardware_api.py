"""The public surface of ``buildtools.hardware`` and its promise never to raise."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import pytest

from buildtools import hardware
from buildtools._runner import Completed
from buildtools.hardware import Backend, PlatformInfo, detect
from buildtools.hardware import _model as model
from tests.unit.hardware_fakes import LINUX_ARM, LINUX_X86, MAC_ARM, WINDOWS, FakeNvml


def test_public_surface() -> None:
    """The model classes and the two entry points, each documented."""
    assert set(hardware.__all__) == {*model.__all__, "detect", "detect_cpu"}
    for name in hardware.__all__:
        assert inspect.getdoc(getattr(hardware, name)), name


def junk_runner(args: Sequence[str], *, timeout: float = 20.0, env: object = None) -> Completed:
    return Completed(
        tuple(args), 0, "\x00GPU0:\n\tvendorID = zz\n: : :\nrelease x.y\n{not json", ""
    )


@pytest.mark.parametrize("platform_info", [LINUX_X86, LINUX_ARM, MAC_ARM, WINDOWS])
def test_detect_survives_garbage_everywhere(
    tmp_path: Path, platform_info: PlatformInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_py_cpuinfo() -> dict[str, object]:
        raise RuntimeError("py-cpuinfo blew up")

    monkeypatch.setattr("buildtools.hardware.cpu._default_cpuinfo_reader", broken_py_cpuinfo)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_bytes(b"\xff\xfe flags : \x00\n\n:\n")
    profile = detect(
        env={"PATH": "", "CC": "'unbalanced"},
        runner=junk_runner,
        proc_root=tmp_path,
        nvml=FakeNvml(init_error=OSError("libnvidia-ml.so.1: cannot open shared object file")),
        platform_info=platform_info,
    )
    assert set(profile.backends) == set(Backend)
    assert "libnvidia-ml" in profile.backends[Backend.CUDA].reason
