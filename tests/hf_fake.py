"""A local stand-in for the Hugging Face Hub endpoints ``huggingface_hub`` downloads through.

The machines have no internet, so tests point ``HF_ENDPOINT`` at this
loopback server. It answers the three calls a pull makes, as the Hub does
(headers and error codes as ``huggingface_hub.utils.hf_raise_for_status``
reads them):

* ``GET /api/models/ORG/REPO[/revision/REV]``: the commit and the file list;
* ``HEAD /ORG/REPO/resolve/REV/FILE``: ``X-Repo-Commit``, ``X-Linked-Etag``
  (the sha256 of an LFS file), ``X-Linked-Size``;
* ``GET`` of the same URL, with ``Range`` support.

Faults the tests ask for: a private repository (401 ``RepoNotFound`` without
the right token, "Invalid credentials" with a wrong one), a gated one (401
``GatedRepo``), a body cut half-way (the connection closed), a body stalled
half-way (until the test releases it), 503s, and a corrupted byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GOOD_TOKEN = "hf_good_token"  # noqa: S105  # the fake hub's only valid token


@dataclass
class FakeRepo:
    #: commit -> {filename: bytes}
    commits: dict[str, dict[str, bytes]]
    #: branch or tag -> commit
    refs: dict[str, str]
    private: bool = False
    gated: bool = False


@dataclass
class Fault:
    #: the next N GETs of a file send half the body, then close the connection
    cut: int = 0
    #: after a cut, the next N GETs answer 503 (the "network" stays down)
    unavailable: int = 0
    #: serve this byte offset flipped
    corrupt_at: int | None = None
    #: called before a GET body is sent (a test can wait on an event here)
    before_body: threading.Event | None = None
    #: the next GET sends half the body, then waits for this event before it closes
    stall: threading.Event | None = None
    #: HEAD answers 302 to this host (another name for the fake), as the Hub sends LFS
    #: files to its CDN
    redirect_host: str | None = None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    fault: Fault = field(default_factory=Fault)
    #: (method, path, Range header or "")
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    #: (path, Authorization header or "") of each request
    auth: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        commit: str | None = None,
        refs: tuple[str, ...] = ("main",),
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Publish ``files`` as a commit of ``repo_id`` (the refs point to it); returns it."""
        commit = (
            commit
            or hashlib.sha1(  # a commit id, as git makes them
                repr(sorted(files)).encode() + repo_id.encode(), usedforsecurity=False
            ).hexdigest()
        )
        repo = self.repos.setdefault(repo_id, FakeRepo(commits={}, refs={}))
        repo.commits[commit] = dict(files)
        repo.refs.update(dict.fromkeys(refs, commit))
        repo.private, repo.gated = private, gated
        return commit

    def gets(self, filename: str) -> list[str]:
        """The Range header of each GET of ``filename`` so far ("" without one)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(f"/{filename}")]


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _error(self, status: int, code: str | None = None, message: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            if message:
                self.send_header("X-Error-Message", message)
            payload = json.dumps({"error": message or code or "error"}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _repo(self, repo_id: str, *, files: bool = False) -> FakeRepo | None:
            """The repository, or None once the error is sent; ``files``: a file is asked
            for (a gated repository shows its listing to anyone, as the Hub does)."""
            repo = hub.repos.get(repo_id)
            auth = self.headers.get("Authorization")
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if auth is not None and auth != f"Bearer {GOOD_TOKEN}":
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            if repo.gated and files and auth is None:
                self._error(401, "GatedRepo", "Access to this model is restricted")
                return None
            if repo.private and auth is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _commit(self, repo: FakeRepo, revision: str) -> str | None:
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return commit

        def _serve(self, *, body: bool) -> None:  # noqa: PLR0911  # one return per error
            path = self.path.split("?")[0]
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Range", "")))
                hub.auth.append((path, self.headers.get("Authorization", "")))
            if m := _CDN.match(path):  # a redirect's target: no token needed, as on a CDN
                repo = hub.repos[m.group(1)]
                data = repo.commits[m.group(2)][m.group(3)]
                self._file(data, {"Accept-Ranges": "bytes"})
                return
            if m := _API.match(path):
                if (repo := self._repo(m.group(1))) is None:
                    return
                if (commit := self._commit(repo, _unquote(m.group(2) or "main"))) is None:
                    return
                names = sorted(repo.commits[commit])
                doc = {"id": m.group(1), "modelId": m.group(1), "sha": commit,
                       "siblings": [{"rfilename": n} for n in names]}  # fmt: skip
                self._send(
                    200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body
                )
                return
            m = _RESOLVE.match(path)
            if m is None:
                self._error(404)
                return
            if (repo := self._repo(m.group(1), files=True)) is None:
                return
            if (commit := self._commit(repo, _unquote(m.group(2)))) is None:
                return
            data = repo.commits[commit].get(m.group(3))
            if data is None:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            sha = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "ETag": f'"{sha}"',
                       "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}  # fmt: skip
            if not body and hub.fault.redirect_host:
                port = self.server.server_address[1]
                where = f"http://{hub.fault.redirect_host}:{port}/cdn/{m.group(1)}/{commit}"
                self._send(302, b"", {**headers, "Location": f"{where}/{m.group(3)}"}, body=False)
                return
            if not body:
                self._send(200, data, headers, body=False)
                return
            self._file(data, headers)

        def _file(self, data: bytes, headers: dict[str, str]) -> None:
            fault = hub.fault
            with hub._lock:
                stall, fault.stall = fault.stall, None
                cut = fault.cut > 0 or stall is not None
                fault.cut -= fault.cut > 0
                down = not cut and fault.unavailable > 0
                fault.unavailable -= down
            if down:
                self._error(503, None, "Service unavailable")
                return
            if fault.corrupt_at is not None:
                data = bytearray(data)
                data[fault.corrupt_at] ^= 0xFF
                data = bytes(data)
            start, status = 0, 200
            if m := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
                start, status = int(m.group(1)), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            part = data[start:]
            if fault.before_body is not None:
                fault.before_body.wait(30)
            if not cut:
                self._send(status, part, headers, body=True)
                return
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            if stall is not None:
                stall.wait(60)
            self.close_connection = True
            self.connection.shutdown(2)

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def _unquote(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value)


def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on a loopback port for the duration of the generator (a fixture body)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="fake-hf", daemon=True
    )
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def tiny_gguf(path: Path, *, name: str = "tiny", quant_pad: int = 0) -> bytes:
    """A small valid GGUF (llama architecture, two layers); returns its bytes."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(32)
    writer.add_tensor("token_embd.weight", np.ones((32, 16), dtype=np.float32))
    for il in range(2):
        writer.add_tensor(f"blk.{il}.attn_q.weight", np.ones((16, 16), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((32, 16 + quant_pad), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
