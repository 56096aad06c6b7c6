"""Download a GGUF model from the Hugging Face Hub into the Hugging Face cache.

``pull("hf:ORG/REPO:Q4_K_M")`` goes through ``huggingface_hub`` for everything
that talks to the Hub, so the cache folder (``HF_HUB_CACHE``/``HF_HOME``), the
token (``HF_TOKEN`` or ``hf auth login``), the endpoint (``HF_ENDPOINT``) and
offline mode (``HF_HUB_OFFLINE``) behave as in every other tool that uses it,
and the files land where those tools find them (``models--ORG--REPO/blobs``,
``snapshots/<commit>/FILE`` links). It owns three things the library's
``hf_hub_download`` does not do:

* **resume across runs**: the bytes go to ``blobs/<etag>.incomplete``, which a
  later pull continues with an HTTP range request (the library's own
  temporary file is deleted when a run fails, so an interrupted 40 GB pull
  would start again from zero);
* **the checksum**: the Hub's etag of a GGUF (an LFS file) is the sha256 of its
  bytes; the download is hashed and compared before it becomes a blob, so a
  partial or corrupt file never appears in the cache as a model, and a
  corrupt one is deleted;
* **a free-space check** for the whole model (every split part) before the
  first byte.

The download holds the library's own lock for that blob
(``.locks/models--ORG--REPO/<etag>.lock``): two pulls of the same file, from
llamactl or any other tool, end with one copy, the second waiting for the
first. ``huggingface_hub`` is imported on first use only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from procman.errors import ModelError
from procman.models import _pulled
from procman.models.hub import HfRef, choose_files, parse_hf_ref

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

__all__ = ["PullError", "PullProgress", "Pulled", "cached", "hf_cache_dir", "pull"]

#: space left free besides the download itself: logs, the GGUF info cache, other writers
FREE_MARGIN = 256 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class PullError(ModelError):
    """A model could not be downloaded (not found, gated, offline, no space, corrupt...)."""


@dataclass(frozen=True, kw_only=True)
class PullProgress:
    """Where a pull is, for a progress bar or a log line."""

    ref: str
    file: str
    #: ``waiting`` (for another download of the same file), ``downloading``, ``verifying``
    stage: str
    done: int
    total: int
    part: int
    parts: int


@dataclass(frozen=True, kw_only=True)
class Pulled:
    """A model in the Hugging Face cache, complete and verified."""

    ref: str
    repo_id: str
    commit: str
    files: tuple[str, ...]
    #: snapshot paths, in ``files`` order; the first is what llama-server opens
    paths: tuple[Path, ...]
    size_bytes: int
    #: bytes this call fetched (0: everything was in the cache already)
    downloaded_bytes: int

    @property
    def path(self) -> Path:
        return self.paths[0]


OnProgress = Callable[[PullProgress], None]
FreeSpace = Callable[[Path], int]


def hf_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` resolves it from the environment."""
    env = os.environ if env is None else env
    if explicit := env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(explicit).expanduser()
    if hf_home := env.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _offline(env: Mapping[str, str]) -> bool:
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _storage(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def cached(ref: str | HfRef, *, cache_dir: Path | None = None) -> Pulled | None:
    """The model ``ref`` names if the cache holds it complete, without any network.

    The revision is looked up as ``huggingface_hub`` does offline: a commit is
    used as is, a branch or tag through ``refs/<name>`` (default ``main``).
    """
    hf = parse_hf_ref(ref) if isinstance(ref, str) else ref
    storage = _storage(cache_dir or hf_cache_dir(), hf.repo_id)
    revision = hf.revision or "main"
    commit = revision if _COMMIT.match(revision) else _read_ref(storage, revision)
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None
    files = [
        p.relative_to(snapshot).as_posix()
        for p in snapshot.rglob("*.gguf")
        if p.is_file()  # a link to a missing blob is not a model
    ]
    try:
        chosen = choose_files(hf, files)
    except ModelError:
        return None
    paths = tuple(snapshot / f for f in chosen)
    return Pulled(
        ref=str(hf),
        repo_id=hf.repo_id,
        commit=snapshot.name,
        files=chosen,
        paths=paths,
        size_bytes=sum(p.stat().st_size for p in paths),
        downloaded_bytes=0,
    )


def _read_ref(storage: Path, revision: str) -> str | None:
    try:
        commit = (storage / "refs" / revision).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if _COMMIT.match(commit) else None


def _free_space(path: Path) -> int:
    while not path.exists():  # the cache may not exist yet: ask about the disk it will be on
        path = path.parent
    return shutil.disk_usage(path).free


def pull(
    ref: str | HfRef,
    *,
    on_progress: OnProgress | None = None,
    cache_dir: Path | None = None,
    free_space: FreeSpace = _free_space,
    env: Mapping[str, str] | None = None,
) -> Pulled:
    """Make sure the model ``ref`` names is in the cache, complete and verified; describe it.

    Online, the revision is resolved on the Hub (so a newer commit of a branch
    is fetched); offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) the
    cache answers alone. Raises :class:`PullError` with what to do.
    """
    env = os.environ if env is None else env
    hf = parse_hf_ref(ref) if isinstance(ref, str) else ref
    cache = cache_dir or hf_cache_dir(env)
    if _offline(env):
        if (found := cached(hf, cache_dir=cache)) is not None:
            return found
        raise PullError(
            f"{hf} is not in the Hugging Face cache ({cache}) and offline mode is on",
            hint="unset HF_HUB_OFFLINE to download it, or pass a local .gguf path",
        )
    endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    session = _Session(hf, endpoint, cache, env)
    try:
        commit, files = session.listing()
    except _Unreachable as exc:
        if (found := cached(hf, cache_dir=cache)) is not None:
            return found  # as huggingface_hub does: the cache answers when the Hub cannot
        raise exc.error from exc.__cause__
    chosen = choose_files(hf, files)
    metas = [session.metadata(commit, f) for f in chosen]
    storage = _storage(cache, hf.repo_id)
    _check_space(hf, storage, metas, free_space)
    downloaded = 0
    paths = []
    for part, (filename, meta) in enumerate(zip(chosen, metas, strict=True), 1):
        report = _Reporter(on_progress, str(hf), filename, part, len(chosen), meta.size or 0)
        downloaded += session.fetch(storage, meta, report)
        paths.append(_link(storage, commit, filename, str(meta.etag)))
    if hf.revision is None or hf.revision != commit:
        _write_ref(storage, hf.revision or "main", commit)
    result = Pulled(
        ref=str(hf),
        repo_id=hf.repo_id,
        commit=commit,
        files=chosen,
        paths=tuple(paths),
        size_bytes=sum(m.size or 0 for m in metas),
        downloaded_bytes=downloaded,
    )
    if downloaded:
        _pulled.record(result, cache, etags=[str(m.etag) for m in metas])
    return result


def _check_space(
    hf: HfRef, storage: Path, metas: list[HfFileMetadata], free_space: FreeSpace
) -> None:
    need = 0
    for meta in metas:
        blob = storage / "blobs" / str(meta.etag)
        if not blob.exists():
            partial = _size_or_zero(blob.with_name(f"{meta.etag}.incomplete"))
            need += max((meta.size or 0) - partial, 0)
    if not need:
        return
    free = free_space(storage)
    if free < need + FREE_MARGIN:
        from procman._units import format_bytes  # speed

        raise PullError(
            f"not enough free disk space to pull {hf}: it needs {format_bytes(need)} "
            f"(+{format_bytes(FREE_MARGIN)} margin), {format_bytes(free)} is free "
            f"where the Hugging Face cache is ({storage.parent})",
            hint="free some space, or point HF_HUB_CACHE at a larger disk",
        )


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Unreachable(Exception):
    """The Hub could not be reached: the cache may still answer."""

    def __init__(self, error: PullError) -> None:
        super().__init__(error.message)
        self.error = error


class _Session:
    """The calls to ``huggingface_hub`` for one pull, and the translation of its errors."""

    def __init__(self, hf: HfRef, endpoint: str, cache: Path, env: Mapping[str, str]) -> None:
        self.hf, self.endpoint, self.cache = hf, endpoint, cache
        self.token: str | None = env.get("HF_TOKEN") or None

    def listing(self) -> tuple[str, list[str]]:
        """The commit the revision points to, and the repository's files at that commit."""
        from huggingface_hub import HfApi  # speed

        with self._translated():
            info = HfApi(endpoint=self.endpoint, token=self.token).model_info(
                self.hf.repo_id, revision=self.hf.revision
            )
        files = [s.rfilename for s in info.siblings or ()]
        if not info.sha:
            raise PullError(f"{self.endpoint} did not say which commit {self.hf} is")
        return info.sha, files

    def metadata(self, commit: str, filename: str) -> HfFileMetadata:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url  # speed

        url = hf_hub_url(self.hf.repo_id, filename, revision=commit, endpoint=self.endpoint)
        with self._translated(filename):
            meta = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
        if not meta.etag or meta.size is None:
            raise PullError(
                f"{self.endpoint} did not give the size and checksum of {filename}",
                hint="try again later; if it persists, download the file by hand",
            )
        return meta

    def fetch(self, storage: Path, meta: HfFileMetadata, report: _Reporter) -> int:
        """Put the blob in place (download, resume, verify); returns the bytes fetched."""
        from huggingface_hub.utils._fixes import WeakFileLock  # speed

        etag, size = str(meta.etag), int(meta.size or 0)
        blob = storage / "blobs" / etag
        if blob.exists():
            return 0
        lock = self.cache / ".locks" / storage.name / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        report("waiting", 0)
        with WeakFileLock(lock):
            if blob.exists():  # another process fetched it while we waited
                return 0
            partial = blob.with_name(f"{etag}.incomplete")
            start = _size_or_zero(partial)
            if start > size:
                partial.unlink()
                start = 0
            with self._translated(report.file), _open_at(partial, start) as f:
                self._download(meta, f, start, size, report)
            report("verifying", size)
            _verify(partial, etag, size, report.file)
            partial.chmod(0o666 & ~_umask())
            os.replace(partial, blob)
        return size - start

    def _download(
        self, meta: HfFileMetadata, f: IO[bytes], start: int, size: int, rep: _Reporter
    ) -> None:
        from huggingface_hub.file_download import http_get  # speed
        from huggingface_hub.utils._headers import build_hf_headers  # speed
        from huggingface_hub.utils.tqdm import silent_tqdm  # speed

        headers = build_hf_headers(token=self.token)
        if _host(str(meta.location)) not in {_host(self.endpoint), "huggingface.co"}:
            # a signed CDN address, as LFS files usually get: the token is not for it
            # (huggingface_hub's own download drops it the same way)
            headers.pop("authorization", None)
        http_get(
            str(meta.location),
            _Counting(f, start, rep),  # type: ignore[arg-type]  # write/seek/tell/truncate is all it uses
            resume_size=start,
            headers=headers,
            expected_size=size,
            tqdm_class=silent_tqdm,
        )

    @contextlib.contextmanager
    def _translated(self, filename: str | None = None) -> Iterator[None]:
        """``huggingface_hub`` and network exceptions -> :class:`PullError` with a hint."""
        from huggingface_hub import errors  # speed

        hf, where = self.hf, self.endpoint
        page = f"{where}/{hf.repo_id}"
        login = "set HF_TOKEN to a token with read access (or run `hf auth login`)"
        try:
            yield
        except errors.GatedRepoError as exc:
            raise PullError(
                f"{hf.repo_id} is gated: its files need an accepted licence and a token",
                hint=f"accept the conditions at {page}, then {login}",
            ) from exc
        except errors.RepositoryNotFoundError as exc:
            raise PullError(
                f"repository {hf.repo_id} not found on {where}"
                + (" (or the token cannot see it)" if self.token else ""),
                hint="check ORG/REPO (search at https://huggingface.co/models?library=gguf); "
                f"a private repository needs HF_TOKEN{'' if self.token else ' set'}",
            ) from exc
        except errors.RevisionNotFoundError as exc:
            raise PullError(
                f"{hf.repo_id} has no revision {hf.revision!r}",
                hint=f"name a branch, tag or commit listed at {page}/tree/main",
            ) from exc
        except errors.RemoteEntryNotFoundError as exc:
            raise PullError(f"{hf.repo_id} has no file {filename}", hint=f"see {page}") from exc
        except errors.OfflineModeIsEnabled as exc:
            raise PullError(
                f"{hf} is not in the cache and huggingface_hub is in offline mode",
                hint="unset HF_HUB_OFFLINE to download it",
            ) from exc
        except errors.HfHubHTTPError as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise PullError(
                    f"{where} refused the token for {hf.repo_id} (HTTP {status})",
                    hint=f"the token in HF_TOKEN is wrong or expired: {login}",
                ) from exc
            raise PullError(
                f"{where} answered HTTP {status} for {hf}: {str(exc).splitlines()[0]:.200}",
                hint="try again later; a partial download is kept and resumed",
            ) from exc
        except Exception as exc:
            # connection refused, reset, timed out, DNS: OSError, or the HTTP client's own
            network = type(exc).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore"}
            if not (network or isinstance(exc, OSError)):
                raise
            raise _Unreachable(
                PullError(
                    f"cannot download {hf}: {where} is unreachable ({_reason(exc)})",
                    hint="check the network (or HF_ENDPOINT) and pull again; an interrupted "
                    "download resumes where it stopped",
                )
            ) from exc


def _host(url: str) -> str:
    from urllib.parse import urlsplit  # speed

    return urlsplit(url).netloc.lower()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _open_at(path: Path, start: int) -> Iterator[IO[bytes]]:
    with path.open("r+b" if start else "wb") as f:
        f.seek(start)
        f.truncate()
        yield f


class _Counting:
    """The file ``http_get`` writes to, counting bytes for the progress report."""

    def __init__(self, f: IO[bytes], start: int, report: _Reporter) -> None:
        self._f, self.done, self._report = f, start, report

    def write(self, chunk: bytes) -> int:
        n = self._f.write(chunk)
        self.done += len(chunk)
        self._report("downloading", self.done)
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._f.seek(offset, whence)
        self.done = pos
        return pos

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)


class _Reporter:
    """Calls ``on_progress`` at most every 0.1 s (and at every stage change)."""

    def __init__(
        self, on_progress: OnProgress | None, ref: str, file: str, part: int, parts: int, total: int
    ) -> None:
        self.on_progress, self.ref, self.file = on_progress, ref, file
        self.part, self.parts, self.total = part, parts, total
        self._last = (0.0, "")

    def __call__(self, stage: str, done: int) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if stage == self._last[1] and now - self._last[0] < 0.1 and done < self.total:
            return
        self._last = (now, stage)
        self.on_progress(
            PullProgress(
                ref=self.ref, file=self.file, stage=stage, done=done, total=self.total,
                part=self.part, parts=self.parts,
            )
        )  # fmt: skip


def _verify(partial: Path, etag: str, size: int, filename: str) -> None:
    """Compare the bytes with the Hub's etag: sha256 for LFS files, the git blob sha1 else."""
    actual_size = partial.stat().st_size
    if actual_size != size:
        partial.unlink()
        raise PullError(
            f"{filename}: the download has {actual_size} bytes, the Hub says {size}",
            hint="pull again",
        )
    if len(etag) == 64:
        digest = hashlib.sha256()
    elif len(etag) == 40:
        digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    else:
        return  # an etag that is no content hash (a proxy's?): the size check is all there is
    with partial.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != etag.lower():
        partial.unlink()
        raise PullError(
            f"{filename} is corrupt: its checksum is {digest.hexdigest()}, the Hub says {etag}; "
            "the download was deleted",
            hint="pull again; if it happens again, a proxy or the disk is altering the bytes",
        )


def _link(storage: Path, commit: str, filename: str, etag: str) -> Path:
    """The snapshot entry for ``filename``, a relative link to its blob (as the library makes)."""
    pointer = storage / "snapshots" / commit / filename
    if not pointer.exists():
        pointer.parent.mkdir(parents=True, exist_ok=True)
        blob = storage / "blobs" / etag
        with contextlib.suppress(FileNotFoundError):
            pointer.unlink()  # a dangling link left by a removed blob
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except FileExistsError:
            pass  # another pull made it meanwhile
        except OSError:  # no symlinks on this filesystem: the library then copies too
            shutil.copyfile(blob, pointer)
    return pointer


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    ref = storage / "refs" / revision
    with contextlib.suppress(OSError):
        if ref.read_text() == commit:
            return
    from buildtools.paths import write_atomic  # speed

    write_atomic(ref, commit.encode())
