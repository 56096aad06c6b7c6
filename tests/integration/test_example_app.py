"""examples/desktop_app.py in a real terminal (tmux): type a message, see the answer."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")

# CI installs tmux (.ci/run); there a missing tmux is a failure, not a skip
pytestmark = pytest.mark.skipif(
    TMUX is None and not os.environ.get("CI"), reason="needs tmux (apt install tmux)"
)


def tmux(*args: str) -> str:
    assert TMUX is not None
    return subprocess.run(
        [TMUX, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@pytest.fixture
def session(tmp_path: Path) -> Iterator[str]:
    name = f"llamactl-test-{os.getpid()}"
    yield name
    subprocess.run(
        [TMUX or "tmux", "kill-session", "-t", name], check=False, capture_output=True, timeout=10
    )


def screen(name: str) -> str:
    try:
        return tmux("capture-pane", "-p", "-J", "-t", name, "-S", "-200")
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"the tmux session {name} is gone: {exc.stderr}")


def wait_for(name: str, found: Callable[[str], bool], seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while True:
        text = screen(name)
        if found(text):
            return text
        assert time.monotonic() < deadline, f"timed out; the screen shows:\n{text}"
        time.sleep(0.2)


@pytest.mark.slow
def test_chat_message_through_the_terminal_ui(
    session: str, llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "h"
    (home / "models").mkdir(parents=True)
    for item in demo_model.parent.iterdir():
        if item.name.endswith((".gguf", ".sha256")):
            (home / "models" / item.name).symlink_to(item)
    env = {"LLAMACTL_HOME": str(home), "LLAMACTL_SERVER": str(llama_server)}
    command = " ".join(
        [
            "env",
            *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
            shlex.quote(sys.executable),
            shlex.quote(str(REPO / "examples" / "desktop_app.py")),
            "demo --ctx 512 --max-tokens 12",
        ]
    )
    # the pane stays, with the exit status, so that a failure shows what the app printed
    command = f"{command}; echo app exited $?; sleep 60"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(REPO), command)
    text = wait_for(session, lambda t: "you>" in t, 90)
    assert "ready" in text and "MiB" in text  # the model table: state and memory
    tmux("send-keys", "-t", session, "Say hello in three words.", "Enter")
    text = wait_for(session, lambda t: "demo>" in t, 60)
    answer = text.split("demo>", 1)[1].splitlines()[0].strip()
    print(f"\nthe app's answer: {answer!r}")
    assert answer
    tmux("send-keys", "-t", session, "/quit", "Enter")
    wait_for(session, lambda t: "bye" in t, 30)
