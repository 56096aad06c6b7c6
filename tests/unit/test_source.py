"""Source provisioning: pinned tarball verified by sha256, trees validated, no git needed."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from buildtools import source as src
from buildtools._runner import Completed
from buildtools.errors import DownloadError, SourceError
from buildtools.fetch import Artefact, fetch


def make_tree(root: Path) -> Path:
    for rel in (
        "CMakeLists.txt",
        "ggml/CMakeLists.txt",
        "include/llama.h",
        "tools/server/server.cpp",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"// {rel}\n")
    return root


def make_sdist(path: Path, prefix: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for rel in (
            "CMakeLists.txt",
            "ggml/CMakeLists.txt",
            "include/llama.h",
            "tools/server/server.cpp",
            ".git",
        ):
            data = f"// {rel}\n".encode()
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        extra = tarfile.TarInfo("llama_cpp_python-0.3.36/setup.py")
        extra.size = 0
        tf.addfile(extra, io.BytesIO(b""))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


class FakePip:
    """Stands in for ``pip download``: writes ``payload`` as the requested file."""

    def __init__(self, payload: bytes | None, filename: str) -> None:
        self.payload = payload
        self.filename = filename
        self.calls: list[Sequence[str]] = []

    def __call__(
        self, args: Sequence[str], *, timeout: float = 0, env: Mapping[str, str] | None = None
    ) -> Completed:
        self.calls.append(args)
        if self.payload is None:
            return Completed(tuple(args), 1, "", "ERROR: No matching distribution found")
        dest = Path(args[list(args).index("-d") + 1])
        (dest / self.filename).write_bytes(self.payload)
        return Completed(tuple(args), 0, "Saved", "")


def test_validate_tree_rejects_a_directory_that_is_not_llama_cpp(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text("")
    with pytest.raises(SourceError, match=r"not a llama.cpp source tree.*include/llama.h"):
        src.validate_tree(tmp_path)


def test_explicit_directory_is_hashed_by_content(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "llama")
    a = src.provision(tree, home=tmp_path / "home", env={})
    assert a.origin == "directory" and a.version == "unknown"
    (tree / "ggml" / "CMakeLists.txt").write_text("changed")
    b = src.provision(tree, home=tmp_path / "home", env={})
    assert a.source_id != b.source_id


def test_missing_explicit_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        src.provision(tmp_path / "nope", home=tmp_path, env={})


def test_pinned_tarball_is_verified_extracted_once_and_versioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = make_sdist(tmp_path / "sdist.tar.gz", src.PINNED.member_prefix)
    pin = src._Pin(
        build=11312,
        commit=src.PINNED.commit,
        tarball=Artefact(
            requirement="llama-cpp-python==0.3.36",
            filename="llama_cpp_python-0.3.36.tar.gz",
            sha256=hashlib.sha256(payload).hexdigest(),
            size=len(payload),
            sdist=True,
        ),
        member_prefix=src.PINNED.member_prefix,
    )
    monkeypatch.setattr(src, "PINNED", pin)
    monkeypatch.setattr(src, "submodule_dir", lambda: tmp_path / "no-submodule")
    pip = FakePip(payload, pin.tarball.filename)
    tree = src.provision(home=tmp_path / "home", runner=pip, env={})
    assert tree.origin == "tarball"
    assert tree.cmake_version_defines() == {
        "LLAMA_BUILD_NUMBER": "11312",
        "LLAMA_BUILD_COMMIT": "0c1e570",
    }
    assert (tree.path / "include" / "llama.h").is_file()
    assert not (tree.path / ".git").exists(), "the dangling gitlink must not survive extraction"
    call = pip.calls[0]
    # the sdist of llama-cpp-python only: ":all:" would compile pip's build deps (cmake)
    assert call[call.index("--no-binary") + 1] == "llama-cpp-python"
    again = src.provision(home=tmp_path / "home", runner=pip, env={})
    assert again == tree and len(pip.calls) == 1, (
        "second provision must reuse the download and tree"
    )


def test_wrong_hash_download_is_refused(tmp_path: Path) -> None:
    art = Artefact(requirement="x==1", filename="x-1.tar.gz", sha256="0" * 64, sdist=True)
    with pytest.raises(DownloadError, match="failed verification: sha256"):
        fetch(art, tmp_path, runner=FakePip(b"evil", art.filename))
    assert not (tmp_path / art.filename).exists()


def test_truncated_download_is_refused(tmp_path: Path) -> None:
    art = Artefact(requirement="x==1", filename="x-1.tar.gz", sha256="0" * 64, size=100)
    with pytest.raises(DownloadError, match="truncated"):
        fetch(art, tmp_path, runner=FakePip(b"short", art.filename))


def test_index_failure_says_what_to_do(tmp_path: Path) -> None:
    art = Artefact(requirement="x==1", filename="x-1.tar.gz", sha256="0" * 64)
    with pytest.raises(DownloadError, match="could not download x==1") as info:
        fetch(art, tmp_path, runner=FakePip(None, art.filename))
    assert info.value.hint and "pip" in info.value.hint


def test_tarball_given_with_source_must_match_the_pin(tmp_path: Path) -> None:
    bogus = tmp_path / "llama.tar.gz"
    bogus.write_bytes(b"not the pinned tarball")
    with pytest.raises(SourceError, match=r"sha256|bytes"):
        src.provision(bogus, home=tmp_path / "home", env={})
