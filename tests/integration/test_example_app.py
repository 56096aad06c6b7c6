"""examples/desktop_app.py in a real terminal: type a message, see the answer.

The app runs on a pseudo-terminal (the stdlib ``pty`` module), 160 columns by
50 rows, as under a terminal emulator: rich sees a terminal, ``input`` reads
typed lines, Enter is a carriage return. No tmux or other tool is needed.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Processes

REPO = Path(__file__).resolve().parents[2]
#: colours, cursor movement, bracketed paste, and the CR of each CRLF
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\r")


class Terminal:
    """One program on a pseudo-terminal; what it printed so far, as plain text."""

    def __init__(self, processes: Processes, columns: int = 160, rows: int = 50) -> None:
        self.master, self.follower = pty.openpty()
        size = struct.pack("HHHH", rows, columns, 0, 0)
        fcntl.ioctl(self.follower, termios.TIOCSWINSZ, size)
        self.processes = processes
        self.raw = ""
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    @property
    def text(self) -> str:
        # stripped as a whole: a control sequence may arrive split over two reads
        return _CONTROL.sub("", self.raw)

    def start(self, argv: list[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        tty = self.follower
        proc = self.processes.popen(argv, stdin=tty, stdout=tty, stderr=tty, **kwargs)
        os.close(tty)  # the program holds it now: its exit ends the reads with EIO
        self.follower = -1
        return proc

    def close(self) -> None:
        for fd in (self.master, self.follower):
            if fd >= 0:
                os.close(fd)

    def wait_for(self, found: Callable[[str], bool], seconds: float, what: str) -> str:
        deadline = time.monotonic() + seconds
        while not found(self.text):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {what} in {seconds:g} s; the terminal shows:\n{self.text}")
            readable, _, _ = select.select([self.master], [], [], left)
            if readable:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: nothing has the terminal open any more
                    data = b""
                if not data:
                    pytest.fail(f"the app exited before {what}; the terminal shows:\n{self.text}")
                self.raw += self._decode(data)
        return self.text

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")


@pytest.fixture
def terminal(processes: Processes) -> Iterator[Terminal]:
    term = Terminal(processes)
    try:
        yield term
    finally:
        term.close()


@pytest.mark.slow
def test_chat_message_through_the_terminal_ui(
    terminal: Terminal, llama_server: Path, demo_model: Path, tmp_path: Path
) -> None:
    home = tmp_path / "h"
    (home / "models").mkdir(parents=True)
    for item in demo_model.parent.iterdir():
        if item.name.endswith((".gguf", ".sha256")):
            (home / "models" / item.name).symlink_to(item)
    env = {**os.environ, "LLAMACTL_HOME": str(home), "LLAMACTL_SERVER": str(llama_server)}
    env.pop("COLUMNS", None)  # the terminal's own size, as a user's
    env.pop("LINES", None)
    env.setdefault("TERM", "xterm-256color")
    app_args = ["demo", "--ctx", "512", "--max-tokens", "12"]
    app = terminal.start(
        [sys.executable, REPO / "examples" / "desktop_app.py", *app_args], env=env, cwd=REPO
    )
    text = terminal.wait_for(lambda t: "you>" in t, 120, "chat prompt")
    assert "ready" in text and "MiB" in text  # the model table: state and memory
    terminal.type("Say hello in three words.")
    text = terminal.wait_for(lambda t: "demo>" in t, 120, "answer")
    answer = text.split("demo>", 1)[1].splitlines()[0].strip()
    print(f"\nthe app's answer: {answer!r}")
    assert answer
    terminal.type("/quit")
    terminal.wait_for(lambda t: "bye" in t, 60, "goodbye")
    assert app.wait(timeout=60) == 0
