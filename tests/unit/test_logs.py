"""Server logs: appended, rotated by size, tailed in memory, read back and followed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from procman.process.logs import LineTail, RotatingLog, follow, log_path, read_tail


def test_log_path_is_under_the_home(tmp_path: Path) -> None:
    assert log_path("demo", tmp_path) == tmp_path / "logs" / "demo.log"


def test_appends_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "a.log"
    first = RotatingLog(path)
    first.write(b"one\n")
    first.close()
    second = RotatingLog(path)
    second.write(b"two\n")
    second.close()
    assert path.read_bytes() == b"one\ntwo\n"


def test_rotates_by_size_keeping_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = RotatingLog(path, max_bytes=10, backups=2)
    for chunk in (b"aaaaaaaa\n", b"bbbbbbbb\n", b"cccccccc\n", b"dddddddd\n"):
        log.write(chunk)
    log.close()
    assert path.read_bytes() == b"dddddddd\n"
    assert (tmp_path / "a.log.1").read_bytes() == b"cccccccc\n"
    assert (tmp_path / "a.log.2").read_bytes() == b"bbbbbbbb\n"
    assert not (tmp_path / "a.log.3").exists()


def test_existing_size_counts_towards_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 9)
    log = RotatingLog(path, max_bytes=10, backups=1)
    log.write(b"yy")
    log.close()
    assert (tmp_path / "a.log.1").read_bytes() == b"x" * 9
    assert path.read_bytes() == b"yy"


def test_line_tail_keeps_last_lines_and_partial_line() -> None:
    tail = LineTail(lines=2)
    tail.feed(b"one\ntwo\nthr")
    tail.feed(b"ee\nfou")
    assert tail.text() == "two\nthree\nfou"
    tail.clear()
    assert tail.text() == ""


def test_line_tail_decodes_leniently() -> None:
    tail = LineTail()
    tail.feed(b"bad \xff byte\r\n")
    assert tail.text() == "bad \ufffd byte"


def test_read_tail_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    path.write_text("".join(f"line {i}\n" for i in range(10000)))
    assert read_tail(path, 3) == ["line 9997", "line 9998", "line 9999"]
    assert read_tail(path, 0) == []
    short = tmp_path / "short.log"
    short.write_text("a\nb")
    assert read_tail(short, 10) == ["a", "b"]


async def _collect(agen: AsyncIterator[str], until: str) -> str:
    seen = ""

    async def run() -> None:
        nonlocal seen
        async for text in agen:
            seen += text
            if until in seen:
                return

    await asyncio.wait_for(run(), 5)
    return seen


async def test_follow_prints_the_tail_then_new_text(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("old 1\nold 2\nold 3\n")
    agen = follow(path, lines=2, interval=0.01)

    async def append_later() -> None:
        await asyncio.sleep(0.05)
        with path.open("a") as f:
            f.write("new\n")

    writer = asyncio.create_task(append_later())
    seen = await _collect(agen, "new\n")
    await writer
    await agen.aclose()
    assert seen == "old 2\nold 3\nnew\n"


async def test_follow_survives_rotation(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = RotatingLog(path, max_bytes=20, backups=1)
    log.write(b"before rotation\n")
    agen = follow(path, interval=0.01)

    async def write_later() -> None:
        await asyncio.sleep(0.05)
        log.write(b"tail of old\n")  # 16 + 12 > 20: rotates first, lands in the new file
        await asyncio.sleep(0.05)
        log.write(b"more\n")

    writer = asyncio.create_task(write_later())
    seen = await _collect(agen, "more\n")
    await writer
    await agen.aclose()
    log.close()
    assert seen == "tail of old\nmore\n"


def test_logs_command_prints_the_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import procman.cli._serve  # noqa: F401 - registers `logs` until _commands lists it
    from procman.cli._main import run

    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "demo.log").write_text("a\nb\nc\n")
    assert run(["logs", "demo", "-n", "2"]) == 0
    assert capsys.readouterr().out == "b\nc\n"
    assert run(["logs", "nope"]) == 1
    assert "logs exist for: demo" in capsys.readouterr().err
