"""Give a built wheel a local version label that says what it carries.

``pip wheel`` produces ``llamactl-0.1.0-py3-none-linux_x86_64.whl`` whatever
the server inside was built for. Like PyTorch's ``+cu124``, a label such as
``+cpu`` or ``+cpu.portable`` lets two builds of the same release sit side by
side on an index and tells a user which one they have. The wheel format
keeps the version in three places (file name, .dist-info directory,
METADATA) plus RECORD's hashes; all are rewritten together.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

__all__ = ["relabel"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def relabel(wheel: Path, label: str) -> Path:
    """Write ``wheel`` again with version ``<version>+<label>``; returns the new path."""
    if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", label):
        raise ValueError(f"invalid local version label {label!r}")
    name, version, rest = wheel.name.split("-", 2)
    base = version.split("+", 1)[0]
    new_version = f"{base}+{label}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = wheel.with_name(f"{name}-{new_version}-{rest}")
    records: list[str] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            arcname = item.filename
            if arcname == old_info + "RECORD":
                continue
            data = src.read(item)
            if arcname.startswith(old_info):
                arcname = new_info + arcname[len(old_info) :]
                if arcname == new_info + "METADATA":
                    data = re.sub(
                        rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1
                    )
            info = zipfile.ZipInfo(arcname, date_time=item.date_time)
            info.external_attr = item.external_attr
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            records.append(f"{arcname},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        record = _record_info(new_info + "RECORD")
        dst.writestr(record, "\n".join(records) + "\n")
    wheel.unlink()
    return target


def _record_info(arcname: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info
