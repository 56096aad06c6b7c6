"""Where the llama.cpp source comes from, and what exactly it is.

Order: an explicit ``--source`` (a llama.cpp directory, or the pinned
tarball), else the ``llama.cpp/`` git submodule when it is checked out, else
the pinned tarball from the package index, verified by sha256 and extracted
once into the cache. The result is a :class:`SourceTree` whose ``source_id``
feeds the build cache key, so a different tree never reuses a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from buildtools import paths
from buildtools._runner import Runner, capture
from buildtools.errors import LlamactlError, SourceError
from buildtools.fetch import Artefact, copy_verified, fetch

__all__ = ["PINNED", "SourceTree", "provision", "validate_tree"]


@dataclass(frozen=True)
class _Pin:
    build: int
    commit: str
    tarball: Artefact
    member_prefix: str

    @property
    def short_commit(self) -> str:
        return self.commit[:7]


#: The llama.cpp release llamactl is tested with. The same tree ships, whole,
#: inside the llama-cpp-python sdist on the package index.
PINNED = _Pin(
    build=11312,
    commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    tarball=Artefact(
        requirement="llama-cpp-python==0.3.36",
        filename="llama_cpp_python-0.3.36.tar.gz",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        size=76_589_250,
        sdist=True,
    ),
    member_prefix="llama_cpp_python-0.3.36/vendor/llama.cpp/",
)

#: Files whose presence makes a directory a llama.cpp tree we can build.
_REQUIRED = ("CMakeLists.txt", "ggml/CMakeLists.txt", "include/llama.h", "tools/server")
#: What the compile reads; hashing only this keeps the id cheap (~0.3 s).
_HASHED = ("CMakeLists.txt", "cmake", "common", "ggml", "include", "src", "tools", "vendor")
_MARKER = ".llamactl-source.json"


@dataclass(frozen=True, kw_only=True)
class SourceTree:
    """A llama.cpp tree ready to configure."""

    path: Path
    origin: str
    """``tarball``, ``submodule`` or ``directory``."""
    source_id: str
    """Content identity used in build cache keys."""
    build_number: int | None
    commit: str | None

    @property
    def version(self) -> str:
        if self.build_number is None:
            return "unknown"
        return f"b{self.build_number}"

    def cmake_version_defines(self) -> dict[str, str]:
        """Defines that make ``llama-server --version`` tell the truth.

        Without git metadata (a tarball) llama.cpp would report build 0 and
        commit "unknown".
        """
        if self.build_number is None or self.commit is None:
            return {}
        return {"LLAMA_BUILD_NUMBER": str(self.build_number), "LLAMA_BUILD_COMMIT": self.commit[:7]}


def validate_tree(path: Path) -> None:
    """Raise :class:`SourceError` unless ``path`` is a buildable llama.cpp tree."""
    if not path.is_dir():
        raise SourceError(f"{path} is not a directory", hint="pass --source a llama.cpp checkout")
    missing = [rel for rel in _REQUIRED if not (path / rel).exists()]
    if missing:
        raise SourceError(
            f"{path} is not a llama.cpp source tree (missing {', '.join(missing)})",
            hint="pass --source the top of a llama.cpp checkout",
        )


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for top in _HASHED:
        base = path / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for file in files:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return "tree-" + digest.hexdigest()


def _git_identity(path: Path, runner: Runner) -> tuple[int | None, str | None]:
    if not (path / ".git").exists():
        return None, None
    head = runner(["git", "-C", str(path), "rev-parse", "HEAD"], timeout=10)
    if not head.ok:
        return None, None
    commit = head.stdout.strip()
    if commit == PINNED.commit:
        return PINNED.build, commit
    count = runner(["git", "-C", str(path), "rev-list", "--count", "HEAD"], timeout=30)
    return (
        int(count.stdout.strip()) if count.ok and count.stdout.strip().isdigit() else None
    ), commit


def _from_directory(path: Path, origin: str, runner: Runner) -> SourceTree:
    validate_tree(path)
    build, commit = _git_identity(path, runner)
    return SourceTree(
        path=path.resolve(),
        origin=origin,
        source_id=tree_hash(path),
        build_number=build,
        commit=commit,
    )


def _extract_pinned(tarball: Path, sources: Path) -> Path:
    """Extract the pinned tree once; the marker is written last, so a partial
    extraction (Ctrl-C, disk full) is never mistaken for a complete one."""
    dest = sources / f"llama.cpp-b{PINNED.build}-{PINNED.tarball.sha256[:12]}"
    if (dest / _MARKER).is_file():
        return dest
    sources.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=sources, prefix=".extract-"))
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            members = []
            for member in tf.getmembers():
                if not member.name.startswith(PINNED.member_prefix):
                    continue
                member.name = member.name[len(PINNED.member_prefix) :]
                if member.name:
                    members.append(member)
            if not members:
                raise SourceError(f"{tarball} holds no {PINNED.member_prefix} tree")
            tf.extractall(tmp, members=members, filter="data")
        # The sdist carries a submodule gitlink pointing nowhere; git would
        # otherwise walk up and report the commit of whatever repo holds the cache.
        (tmp / ".git").unlink(missing_ok=True)
        validate_tree(tmp)
        (tmp / _MARKER).write_text(
            json.dumps(
                {"build": PINNED.build, "commit": PINNED.commit, "sha256": PINNED.tarball.sha256}
            )
        )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise SourceError(
            f"could not extract {tarball}: {exc}",
            hint="the file may be truncated; delete it and run again to re-download",
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _pinned_tree(path: Path) -> SourceTree:
    return SourceTree(
        path=path,
        origin="tarball",
        source_id="sha256-" + PINNED.tarball.sha256,
        build_number=PINNED.build,
        commit=PINNED.commit,
    )


def submodule_dir() -> Path:
    """The ``llama.cpp/`` submodule of a source checkout of llamactl."""
    return Path(__file__).resolve().parent.parent / "llama.cpp"


def provision(
    explicit: str | os.PathLike[str] | None = None,
    *,
    home: Path | None = None,
    runner: Runner = capture,
    env: Mapping[str, str] | None = None,
) -> SourceTree:
    """Find or fetch the llama.cpp tree to build (see the module docstring)."""
    env = os.environ if env is None else env
    root = home or paths.home()
    explicit = explicit or env.get("LLAMACTL_SOURCE") or None
    if explicit is not None:
        given = Path(explicit).expanduser()
        if given.is_file():
            try:
                tarball = copy_verified(given, PINNED.tarball, root / "downloads")
            except LlamactlError as exc:
                raise SourceError(
                    exc.message, hint="--source takes a llama.cpp directory or the pinned tarball"
                ) from exc
            return _pinned_tree(_extract_pinned(tarball, root / "sources"))
        if not given.exists():
            raise SourceError(f"--source {given} does not exist")
        return _from_directory(given, "directory", runner)

    sub = submodule_dir()
    if (sub / "CMakeLists.txt").is_file():
        return _from_directory(sub, "submodule", runner)

    tarball = fetch(PINNED.tarball, root / "downloads", runner=runner)
    return _pinned_tree(_extract_pinned(tarball, root / "sources"))
