"""Config reloads without processes: the diff, errors with their line, the Reloader applied
to a supervisor whose models are registered but not running (real runs: tests/integration)."""

from __future__ import annotations

import asyncio
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from procman.config import ModelSection, ServerSection, parse_config
from procman.errors import ConfigError, LlamactlError
from procman.events import Event
from procman.reload._read import line_of, read_config
from procman.reload.apply import Loaded, Reloader, queue_settings
from procman.reload.diff import (
    ACCESS_FIELDS,
    IN_PLACE_FIELDS,
    LIMIT_FIELDS,
    LISTENER_FIELDS,
    LOOKUP_FIELDS,
    RESTART_FIELDS,
    Action,
    diff_configs,
)
from procman.reload.report import ReloadReport
from procman.router._guard import Guard
from procman.router.scheduler import QueueClosedError, Scheduler
from procman.supervisor import AsyncSupervisor
from tests.unit.test_model_file import write_model

BASE = """
[server]
port = 8080
max_loaded = 2
[models.a]
path = "M"
ctx = 512
[models.b]
path = "M"
ctx = 512
ttl = "10m"
queue = 8
[models.d]
path = "M"
"""


def config(text: str, model: str = "M") -> Loaded:
    parsed = parse_config(tomllib.loads(text.replace('"M"', f'"{model}"')))
    return Loaded(config=parsed, plan=parsed.plan(Path("/no/llama-server")))


def test_every_field_is_classed_once() -> None:
    model = {f.name for f in fields(ModelSection)}
    assert model == RESTART_FIELDS | IN_PLACE_FIELDS
    assert not RESTART_FIELDS & IN_PLACE_FIELDS
    server = {f.name for f in fields(ServerSection)}
    assert server == LISTENER_FIELDS | ACCESS_FIELDS | LIMIT_FIELDS | LOOKUP_FIELDS
    assert not (LISTENER_FIELDS & ACCESS_FIELDS or ACCESS_FIELDS & LIMIT_FIELDS)


def test_the_diff_sorts_each_model() -> None:
    old = parse_config(tomllib.loads(BASE))
    new_text = (
        BASE.replace('ttl = "10m"', 'ttl = "5m"')
        .replace("[models.d]", '[models.c]\npath = "M"\n[models.e]')
        .replace("ctx = 512\n[models.b]", "ctx = 1024\n[models.b]")
    )
    new = parse_config(tomllib.loads(new_text))
    diff = diff_configs(old, new)
    actions = {m.name: m.action for m in diff.models}
    assert actions == {
        "a": Action.RESTART, "b": Action.IN_PLACE, "d": Action.REMOVED,
        "c": Action.ADDED, "e": Action.ADDED,
    }  # fmt: skip
    b = next(m for m in diff.models if m.name == "b")
    assert [str(c) for c in b.changes] == ["ttl 10m -> 5m"]
    a = next(m for m in diff.models if m.name == "a")
    assert [str(c) for c in a.restart_changes] == ["ctx 512 -> 1024"]
    assert diff.server == () and diff.listener == ()


def test_unchanged_models_and_listener_changes() -> None:
    old = parse_config(tomllib.loads(BASE))
    new = parse_config(tomllib.loads(BASE.replace("port = 8080", "port = 9090")))
    diff = diff_configs(old, new)
    assert all(m.action is Action.UNCHANGED for m in diff.models)
    assert [str(c) for c in diff.listener] == ["port 8080 -> 9090"]
    secret = parse_config(tomllib.loads(BASE.replace("[server]", '[server]\napi_key = "s3cret"')))
    shown = [str(c) for c in diff_configs(old, secret).server]
    assert shown == ["api_key unset -> (a key)"]  # the key itself is never printed


@pytest.mark.parametrize(
    ("path", "line"),
    [("models.b.ttl", 11), ("models.b", 8), ("server.max_loaded", 4), ("models.zz", None),
     ("models.d.path", 14)],
)  # fmt: skip
def test_key_paths_are_found_on_their_line(path: str, line: int | None) -> None:
    assert line_of(BASE, path) == line


def test_a_quoted_dotted_model_name_is_found() -> None:
    text = '[models."qwen2.5"]\npath = "x"\nctx = -1\n'
    assert line_of(text, "models.qwen2.5.ctx") == 3


def test_errors_name_the_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "models.toml"
    file.write_text(BASE.replace('ttl = "10m"', 'ttl = "soon"'))
    with pytest.raises(ConfigError, match=rf"^{file}:11: models\.b\.ttl: "):
        read_config(file)
    file.write_text(BASE.replace("queue = 8", "queue = [8"))
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 13"):
        read_config(file)
    file.write_text(BASE.replace("queue = 8", "qeue = 8"))
    with pytest.raises(ConfigError, match=r":12: models\.b\.qeue: unknown key") as info:
        read_config(file)
    assert info.value.hint == "did you mean 'queue'?"


# -- the Reloader on registered, stopped models ---------------------------------------------
class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.model = str(write_model(tmp_path / "tiny.gguf"))
        self.file = tmp_path / "models.toml"
        self.text = BASE
        self.current = config(BASE, self.model)
        self.supervisor = AsyncSupervisor()
        self.scheduler = Scheduler()
        self.guard = Guard()
        self.events: list[Event] = []
        self.supervisor.bus.subscribe(self.events.append)
        self.reports: list[ReloadReport] = []
        self.refusals: list[str] = []
        for plan in self.current.plan.models:
            self.supervisor.add(plan.spec, validate=False, ttl=plan.ttl, on_demand=True)
            self.scheduler.add(plan.spec.name, queue_settings(plan))
        self.reloader = Reloader(
            file=self.file,
            load=lambda: config(self.text, self.model),
            current=self.current,
            supervisor=self.supervisor,
            scheduler=self.scheduler,
            guard=self.guard,
            on_report=self.reports.append,
            on_refused=lambda exc: self.refusals.append(exc.message),
        )


async def test_in_place_added_and_removed_without_restarting(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    supervisor, scheduler = fleet.supervisor, fleet.scheduler
    d_queue = scheduler.queue("d")
    assert d_queue is not None
    await d_queue.acquire()  # one request for d is in flight...
    waiting = asyncio.create_task(d_queue.acquire())  # ...and one waits in line
    await asyncio.sleep(0)
    fleet.text = (
        BASE.replace('ttl = "10m"', 'ttl = "5m"\naliases = ["bee"]')
        .replace("queue = 8", 'queue = 3\norder = "lifo"')
        .replace("[models.d]", "[models.c]")
        .replace("max_loaded = 2", "max_loaded = 3")
    )
    reload = asyncio.create_task(fleet.reloader.reload())
    with pytest.raises(QueueClosedError, match=r"no longer served: removed from models\.toml"):
        await waiting  # answered at once, while the one in flight still runs
    assert supervisor.find("d") is None  # new requests no longer reach d
    assert not reload.done()
    d_queue.release()  # the request in flight finishes: only now is d removed
    report = await reload
    assert fleet.reports == [report]
    outcomes = {m.name: m for m in report.models}
    assert outcomes["b"].action is Action.IN_PLACE
    assert outcomes["c"].action is Action.ADDED and outcomes["d"].action is Action.REMOVED
    assert outcomes["a"].detail == "unchanged (not running)"
    assert "1 request(s) in flight finished, 1 waiting answered 404" in outcomes["d"].detail
    b_queue = scheduler.queue("b")
    assert b_queue is not None and b_queue.snapshot()["queue"] == 3
    assert b_queue.snapshot()["order"] == "lifo"
    assert supervisor.find("bee") is supervisor.servers["b"]
    assert supervisor.status()[1]["ttl"] == 300
    assert supervisor.max_loaded == 3
    assert "d" not in supervisor.servers and scheduler.queue("d") is None
    assert set(supervisor.servers) == {"a", "b", "c"} and supervisor.on_demand("c")
    assert report.summary().endswith(
        "1 changed in place; 1 added; 1 removed; 1 unchanged; [server]: max_loaded 2 -> 3"
    )
    reloads = [(e.server, e.event) for e in fleet.events if e.event == "reload"]
    assert sorted(reloads) == [("a", "reload"), ("b", "reload"), ("c", "reload"), ("d", "reload")]
    await supervisor.stop()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("port = 8080", "port = 9090"), r"\[server\] port 8080 -> 9090 needs a new listener"),
        (('ttl = "10m"', 'ttl = "-1m"'), r"models\.toml:11: models\.b\.ttl"),
        (
            ("[models.d]", '[models.c]\npath = "/no/such.gguf"\n[models.d]'),
            r":13: models\.c: model not found",
        ),
        (("ctx = 512\n[models.b]", "ctx = 512\naliases = ['b']\n[models.b]"), "taken by"),
    ],
)
async def test_a_refused_reload_changes_nothing(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    fleet = Fleet(tmp_path)
    fleet.file.write_text(BASE.replace(*edit).replace('"M"', f'"{fleet.model}"'))
    fleet.reloader._load = lambda: Loaded(  # read like serve does: from the file
        config=(parsed := read_config(fleet.file)),
        plan=parsed.plan(Path("/no/llama-server")),
    )
    before = {name: server.spec for name, server in fleet.supervisor.servers.items()}
    with pytest.raises(LlamactlError, match=message):
        await fleet.reloader.reload()
    assert {name: s.spec for name, s in fleet.supervisor.servers.items()} == before
    assert fleet.reloader.current is fleet.current
    assert fleet.reports == [] and len(fleet.refusals) == 1
    assert [e for e in fleet.events if e.event == "reload"] == []
    await fleet.supervisor.stop()


async def test_a_restart_of_a_stopped_model_only_takes_the_new_spec(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.text = BASE.replace("ctx = 512\n[models.b]", "ctx = 2048\n[models.b]")
    report = await fleet.reloader.reload()
    a = report.models[0]
    assert a.action is Action.RESTART and a.ok
    assert a.detail == "not running: the new settings apply at its next start"
    assert fleet.supervisor.servers["a"].spec.ctx == 2048
    await fleet.supervisor.stop()


def test_serve_refuses_watch_without_a_config_and_an_unknown_log_format(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from procman.cli._main import run

    assert run(["serve", "--watch"]) == 1
    assert "--watch reloads a config file: pass --config FILE" in capsys.readouterr().err
    assert run(["serve", "--log-format", "xml"]) == 2
    refused = " ".join(capsys.readouterr().err.split())  # typer draws a box around it
    assert "xml" in refused and "--log-format" in refused


def test_reload_without_a_router_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from procman.cli._main import run

    assert run(["reload", "--url", "ftp://nowhere"]) == 1
    assert "the router URL must be http(s)://" in capsys.readouterr().err
