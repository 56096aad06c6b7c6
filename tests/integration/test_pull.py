"""``hf:`` models for real: ``llamactl`` processes pull the demo model and serve it.

The machines reach no Hugging Face, so ``HF_ENDPOINT`` points at
:mod:`tests.hf_fake`, a loopback server in this test process that serves the
real demo model the way the Hub does; everything else is real: the CLI
processes, ``huggingface_hub``, the cache on disk, llama-server, HTTP and the
official openai client.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import openai
import pytest

from procman import bind_listener
from tests.hf_fake import FakeHub, serve
from tests.integration.conftest import Processes

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "procman.cli"]
FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"
REF = "hf:test/SmolLM2-GGUF:Q4_1"


@pytest.fixture(scope="module")
def demo_bytes() -> bytes:
    from buildtools.demo import demo_model_path

    return demo_model_path().read_bytes()


@pytest.fixture
def hub(demo_bytes: bytes) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add("test/SmolLM2-GGUF", {FILE: demo_bytes, "README.md": b"# SmolLM2\n"})
    yield from serve(fake)


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, llama_server: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HOME": str(tmp_path / "user"),  # no real LM Studio/Ollama store
        "LLAMACTL_HOME": str(tmp_path / "home"),
        "LLAMACTL_SERVER": str(llama_server),
        "LLAMACTL_LOG": "WARNING",
        "COLUMNS": "400",
    }


def free_port() -> int:
    sock = bind_listener("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def wait_for_line(proc: subprocess.Popen[str], stream: IO[str], needle: str, timeout: float) -> str:
    """Read ``stream`` until a line holds ``needle`` (the process announcing a state)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(deadline - time.monotonic()):
                break
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    proc.poll()
    pytest.fail(f"no line with {needle!r} (exit {proc.returncode}); output:\n{''.join(seen)}")


def chat(port: int, model: str) -> str:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
    )
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    return answer.choices[0].message.content or ""


def test_serve_an_hf_reference_pulls_it_and_answers_a_chat(
    hub: FakeHub, env: dict[str, str], demo_bytes: bytes, processes: Processes
) -> None:
    port = free_port()
    proc = processes.popen(
        [*CLI, "serve", REF, "--port", str(port), "--ctx", "1024"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    wait_for_line(proc, proc.stderr, "ready", timeout=180)
    assert chat(port, "anything")
    pulled = next(Path(env["HF_HUB_CACHE"]).glob(f"models--test--SmolLM2-GGUF/snapshots/*/{FILE}"))
    assert hashlib.sha256(pulled.read_bytes()).digest() == hashlib.sha256(demo_bytes).digest()
    assert len(hub.gets(FILE)) == 1


def test_a_config_model_is_pulled_on_its_first_request_with_progress_in_ps(
    hub: FakeHub, env: dict[str, str], tmp_path: Path, processes: Processes
) -> None:
    port = free_port()
    config = tmp_path / "models.toml"
    config.write_text(f'[server]\nport = {port}\n\n[models.smol]\npath = "{REF}"\nctx = 1024\n')
    proc = processes.popen(
        [*CLI, "serve", "--config", str(config)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    wait_for_line(proc, proc.stderr, "pulled on first use", timeout=60)
    wait_for_line(proc, proc.stderr, "serving", timeout=60)
    assert hub.gets(FILE) == []  # nothing is fetched before a request asks for the model
    hub.fault.before_body = threading.Event()  # the download waits while ps looks at it
    answers: list[str | BaseException] = []

    def ask() -> None:
        try:
            answers.append(chat(port, "smol"))
        except BaseException as exc:  # reported by the test's own thread
            answers.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        wait_for_line(proc, proc.stderr, "pulling", timeout=60)
        ps = subprocess.run(
            [*CLI, "ps", "--json", "--url", f"http://127.0.0.1:{port}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        (row,) = json.loads(ps.stdout)
        assert row["pulling"].startswith(f"pulling {REF}"), row
    finally:
        hub.fault.before_body.set()
        asker.join(180)
    assert len(answers) == 1 and isinstance(answers[0], str) and answers[0]
    assert len(hub.gets(FILE)) == 1
    logs = subprocess.run(
        [*CLI, "logs", "smol", "--lines", "1000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"pulling {REF}" in logs.stdout and f"pulled {REF}" in logs.stdout


def test_two_pull_processes_at_once_end_with_one_copy(
    hub: FakeHub, env: dict[str, str], demo_bytes: bytes, processes: Processes
) -> None:
    hub.fault.before_body = threading.Event()  # the first download waits for the second pull
    pulls = [
        processes.popen(
            [*CLI, "pull", REF],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 60
    # both have asked for the file's metadata: the next step of each is the blob's lock
    while sum(1 for m, p, _ in hub.requests if m == "HEAD" and p.endswith(FILE)) < 2:
        assert time.monotonic() < deadline, hub.requests
        assert all(p.poll() is None for p in pulls)
        time.sleep(0.05)  # polling another process's progress: it sends no event
    hub.fault.before_body.set()
    outs = [p.communicate(timeout=120) for p in pulls]
    assert [p.returncode for p in pulls] == [0, 0], outs
    paths = {Path(out.strip()) for out, _ in outs}
    (path,) = paths
    assert path.read_bytes() == demo_bytes
    assert len(hub.gets(FILE)) == 1
    blobs = list(Path(env["HF_HUB_CACHE"]).glob("models--test--SmolLM2-GGUF/blobs/*"))
    assert [b.name for b in blobs] == [hashlib.sha256(demo_bytes).hexdigest()]
    assert sum("checksum verified" in err for _, err in outs) == 1
    assert sum("already in the cache" in err for _, err in outs) == 1


def test_a_pull_interrupted_with_ctrl_c_is_resumed_by_the_next_one(
    hub: FakeHub, env: dict[str, str], demo_bytes: bytes, processes: Processes
) -> None:
    stall = hub.fault.stall = threading.Event()  # half the file arrives, then it hangs
    proc = processes.popen(
        [*CLI, "pull", REF], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    blobs = Path(env["HF_HUB_CACHE"]) / "models--test--SmolLM2-GGUF" / "blobs"
    deadline = time.monotonic() + 60
    # huggingface_hub writes 10 MB chunks: wait until some are on disk (the file is all
    # there is to watch in another process)
    while not any(p.stat().st_size > 0 for p in blobs.glob("*.incomplete")):
        assert time.monotonic() < deadline, "no bytes written in 60 s"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        stall.set()
    assert proc.returncode == 130, err
    (partial,) = blobs.glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(demo_bytes)
    assert not list(Path(env["HF_HUB_CACHE"]).rglob(FILE))  # no snapshot link: not a model

    done = subprocess.run(
        [*CLI, "pull", REF], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    assert hub.gets(FILE)[-1] == f"bytes={kept}-"
    assert Path(done.stdout.strip()).read_bytes() == demo_bytes
    assert not partial.exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a real disk too small for the 98 MB demo model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_disk_too_small_is_refused_before_the_download(
    hub: FakeHub, env: dict[str, str], small_disk: Path
) -> None:
    done = subprocess.run(
        [*CLI, "pull", REF], cwd=REPO, env={**env, "HF_HUB_CACHE": str(small_disk / "hf")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not enough free disk space" in done.stderr and "Traceback" not in done.stderr
    assert hub.gets(FILE) == []
    assert not any(small_disk.rglob("*.incomplete"))
    assert not list(small_disk.rglob(f"*{FILE}"))
