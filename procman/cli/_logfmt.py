"""Where ``serve`` writes its own log: stderr, as text for people or JSON for collectors.

``--log-format json`` (or ``LLAMACTL_LOG_FORMAT=json``) makes every line
``serve`` writes one JSON object: the supervisor's events exactly as
:meth:`procman.events.Event.record` shapes them (what ``bus.listen()``
yields, what ``GET /admin/events`` streams), and llamactl's other messages
(``serving``, ``budget``, ``reload``, ``error``, Python ``log`` records) in the
same shape, ``model`` and ``state`` null. Either way each line also goes to
the router's :class:`~procman.router._logs.Journal`, for ``GET /admin/logs``.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from procman.cli._app import console

if TYPE_CHECKING:
    from procman.events import Event
    from procman.router._logs import Journal

__all__ = ["OUTPUT", "LogFormat", "Output"]

_STATE_STYLE = {
    "ready": "green",
    "failed": "bold red",
    "unhealthy": "yellow",
    "restarting": "yellow",
    "waiting_workers": "yellow",
    "refused": "yellow",
    "evicted": "yellow",
}


class LogFormat(StrEnum):
    """How ``serve`` writes its log (``--log-format``)."""

    TEXT = "text"
    """Lines for people, coloured on a terminal."""
    JSON = "json"
    """One JSON object per line, for a log collector."""


def _stamp(when: float) -> str:
    iso = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return iso.replace("+00:00", "Z")


def message_record(event: str, reason: str, *, level: str = "info", **extra: Any) -> dict[str, Any]:
    """A message that is not a server's event, in the events' shape (``model`` null)."""
    return {
        "time": _stamp(time.time()),
        "level": level,
        "event": event,
        "model": None,
        "state": None,
        "previous": None,
        "reason": reason,
        "pid": None,
        "port": None,
        "log_tail": None,
        **extra,
    }


def _plain(markup: str) -> str:
    from rich.text import Text  # speed: ~4 ms, at the first line printed rather than at import

    return Text.from_markup(markup).plain


class _JsonRecords(logging.Formatter):
    """Python's log records (warnings from the library) as the same JSON lines."""

    def format(self, record: logging.LogRecord) -> str:
        reason = record.getMessage()
        if record.exc_info:
            reason += "\n" + self.formatException(record.exc_info)
        level = record.levelname.lower()
        import json  # speed: `serve` imports this module on its way to a first answer

        return json.dumps(message_record("log", reason, level=level, logger=record.name))


class Output:
    """``serve``'s log: text or JSON on stderr, and the journal the router serves."""

    def __init__(self) -> None:
        self.format = LogFormat.TEXT
        self.journal: Journal | None = None
        self._before: list[str] = []  # lines written before the router (and its journal) exist

    def configure(self, log_format: LogFormat) -> None:
        self.format = log_format
        if log_format is LogFormat.JSON:
            for handler in logging.getLogger().handlers:
                handler.setFormatter(_JsonRecords())

    def attach(self, journal: Journal) -> None:
        """Keep the log in ``journal`` too, from the first line written."""
        for line in self._before:
            journal.write(line)
        self._before.clear()
        self.journal = journal

    @property
    def json(self) -> bool:
        return self.format is LogFormat.JSON

    def event(self, event: Event) -> None:
        """One supervisor event."""
        if self.json:
            self._write_json(event.record())
            return
        stamp = datetime.fromtimestamp(event.time).strftime("%H:%M:%S")
        label = event.kind or str(event.state)  # a note says what it is, not the state kept
        style = _STATE_STYLE.get(label, "cyan")
        what = f"{escape(event.server)} [{style}]{label}[/]"
        self._write_text(f"[dim]{stamp}[/] {what} [dim]{escape(event.reason)}[/]")

    def say(self, event: str, markup: str, *, level: str = "info", **extra: Any) -> None:
        """A message of llamactl's own; ``markup`` is rich markup (escaped where it quotes)."""
        if self.json:
            reason = _plain(markup)
            self._write_json(message_record(event, reason, level=level, **extra))
            return
        self._write_text(markup)

    def _write_text(self, markup: str) -> None:
        console.print(markup)
        self._keep(_plain(markup))

    def _write_json(self, record: dict[str, Any]) -> None:
        import json  # speed: see _JsonRecords

        line = json.dumps(record)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self._keep(line)

    def _keep(self, line: str) -> None:
        if self.journal is not None:
            self.journal.write(line)
        elif len(self._before) < 1000:
            self._before.append(line)


#: the one output of this process (``serve`` configures it)
OUTPUT = Output()
