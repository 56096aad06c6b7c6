"""Relabelled wheels stay valid wheels: name, dist-info, METADATA and RECORD agree."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from buildtools._wheelfile import relabel


def make_wheel(path: Path) -> Path:
    wheel = path / "llamactl_server-0.1.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        server = zipfile.ZipInfo("buildtools/bin/llama-server")
        server.external_attr = 0o755 << 16
        zf.writestr(server, b"\x7fELF")
        zf.writestr(
            "llamactl_server-0.1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: llamactl-server\nVersion: 0.1.0\n",
        )
        zf.writestr("llamactl_server-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
        zf.writestr("llamactl_server-0.1.0.dist-info/RECORD", "stale\n")
    return wheel


def test_relabel_rewrites_every_place_the_version_lives(tmp_path: Path) -> None:
    out = relabel(make_wheel(tmp_path), "cpu.portable")
    assert out.name == "llamactl_server-0.1.0+cpu.portable-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert "llamactl_server-0.1.0+cpu.portable.dist-info/METADATA" in names
        assert not any(n.startswith("llamactl_server-0.1.0.dist-info/") for n in names)
        assert b"Version: 0.1.0+cpu.portable" in zf.read(
            "llamactl_server-0.1.0+cpu.portable.dist-info/METADATA"
        )
        assert zf.getinfo("buildtools/bin/llama-server").external_attr >> 16 == 0o755
        record = (
            zf.read("llamactl_server-0.1.0+cpu.portable.dist-info/RECORD").decode().splitlines()
        )
        for line in record:
            name, digest, size = line.rsplit(",", 2)
            if not digest:
                assert name.endswith("RECORD")
                continue
            data = zf.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data)


def test_bad_label_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid local version label"):
        relabel(make_wheel(tmp_path), "CUDA 12")
