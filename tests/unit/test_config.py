"""Config parsing: units, did-you-mean, key paths in errors, the generated docs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from procman._units import format_duration, format_size, parse_duration, parse_size
from procman.config import Order, load_config, parse_config, reference, starter
from procman.errors import ConfigError
from procman.process.endpoint import Endpoint


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * 1024**3), ("512MiB", 512 * 1024**2), ("1.5GB", 1_500_000_000),
        ("2 gib", 2 * 1024**3), ("100", 100), (4096, 4096), ("1k", 1000), ("3TiB", 3 * 1024**4),
    ],
)  # fmt: skip
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "GiB", "2 GiBs", "-1GiB", "two", -5, True, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("90s", 90.0), ("1h30m", 5400.0), ("250ms", 0.25), (30, 30.0),
     ("2", 2.0), ("1.5h", 5400.0), ("1d", 86400.0)],
)  # fmt: skip
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "m", "10x", "10 5m", "5m10", "-3s", False])
def test_bad_durations(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(bad)  # type: ignore[arg-type]


def test_formatting_round_trips() -> None:
    assert format_size(2 * 1024**3) == "2GiB"
    assert format_size(1000) == "1000"
    assert format_duration(600) == "10m"
    assert format_duration(2.5) == "2.5s"


FULL = """
[server]
host = "0.0.0.0"
port = 9000
api_key = "k"
max_loaded = 2
memory_budget = "24GiB"
vram_budget = "auto"

[models.chat]
path = "demo"
ctx = 2048
parallel = 2
gpu_layers = "auto"
memory_limit = "2GiB"
ttl = "10m"
queue = 8
order = "lifo"
args = ["--temp", "0.7"]
aliases = ["default"]

[models.embed]
args = ["--embeddings"]
"""


def test_a_full_file_parses_into_typed_values() -> None:
    config = parse_config(tomllib.loads(FULL))
    assert config.server.port == 9000 and config.server.max_loaded == 2
    assert config.server.memory_budget == 24 * 1024**3 and config.server.vram_budget == "auto"
    chat = config.models["chat"]
    assert chat.memory_limit == 2 * 1024**3 and chat.ttl == 600.0
    assert chat.order is Order.LIFO and chat.args == ("--temp", "0.7")
    assert chat.aliases == ("default",) and chat.gpu_layers == "auto"
    embed = config.models["embed"]
    assert embed.ttl is None and embed.order is Order.FIFO and embed.queue == 64


def test_the_plan_holds_specs_and_scheduling(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    text = FULL.replace('path = "demo"', f"path = {str(model)!r}")
    text = text.replace("[models.embed]", f"[models.embed]\npath = {str(model)!r}")
    plan = parse_config(tomllib.loads(text)).plan(Path("/bin/llama-server"))
    chat = plan.models[0]
    assert chat.spec.name == "chat" and chat.spec.model == model and chat.spec.parallel == 2
    assert chat.spec.aliases == ("default",) and chat.memory_limit == 2 * 1024**3
    assert (
        "--temp" in chat.spec.argv(Endpoint(socket="/r/c.sock"))
        and chat.queue == 8
        and chat.order is Order.LIFO
    )
    assert plan.server.memory_budget == 24 * 1024**3


@pytest.mark.parametrize(
    ("text", "path", "hint"),
    [
        ("[server]\nprot = 1\n[models.a]\n", "server.prot", "did you mean 'port'"),
        ("[models.a]\nttll = '1m'\n", "models.a.ttll", "did you mean 'ttl'"),
        ("[models.a]\nparalel = 2\n", "models.a.paralel", "did you mean 'parallel'"),
        ("[modles.a]\n", "modles", "did you mean 'models'"),
    ],
)
def test_unknown_keys_suggest_the_nearest(text: str, path: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    assert caught.value.message.startswith(f"{path}: unknown key")
    assert hint in (caught.value.hint or "")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[models.a]\nttl = 'soon'\n", "models.a.ttl"),
        ("[models.a]\nttl = 0\n", "models.a.ttl"),
        ("[models.a]\nmemory_limit = '2 gallons'\n", "models.a.memory_limit"),
        ("[models.a]\nparallel = 0\n", "models.a.parallel"),
        ("[models.a]\nctx = '2048'\n", "models.a.ctx"),
        ("[models.a]\norder = 'random'\n", "models.a.order"),
        ("[models.a]\ngpu_layers = 'most'\n", "models.a.gpu_layers"),
        ("[models.a]\nargs = '--embeddings'\n", "models.a.args"),
        ("[server]\nmax_loaded = 0\n[models.a]\n", "server.max_loaded"),
        ("[server]\nvram_budget = 'lots'\n[models.a]\n", "server.vram_budget"),
        ("[server]\nport = true\n[models.a]\n", "server.port"),
        ("[models]\n", "models"),
        ("[models.'bad name']\n", "models.bad name"),
        ("[models.a]\naliases = ['b']\n[models.b]\n", "models.b"),
    ],
)
def test_bad_values_name_the_key(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    assert caught.value.message.startswith(f"{path}:"), caught.value.message


def test_llamactl_owned_args_are_refused_before_any_model_is_resolved() -> None:
    # No path: the model would be the demo, fetched on first use; the config error comes first.
    with pytest.raises(ConfigError, match=r"^models\.a\.args: extra argument '--port'") as caught:
        parse_config(tomllib.loads("[models.a]\nargs = ['--port', '1']\n"))
    assert caught.value.hint and "llamactl sets the model" in caught.value.hint


def test_owned_args_in_key_value_form_are_refused_too() -> None:
    with pytest.raises(ConfigError, match=r"^models\.a\.args: extra argument '--host=0\.0\.0\.0'"):
        parse_config(tomllib.loads("[models.a]\nargs = ['--host=0.0.0.0']\n"))


def test_load_config_reports_the_file(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.a\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    path.write_text("[models.a]\nqueue = -1\n")
    with pytest.raises(ConfigError, match=r"models\.toml: models\.a\.queue"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_the_starter_file_is_valid_and_commented() -> None:
    text = starter()
    config = parse_config(tomllib.loads(text))
    assert set(config.models) == {"chat", "embed"}
    assert "# Idle time after which the server stops" in text
    assert '# api_key = "change-me"' in text


def test_the_reference_documents_every_key() -> None:
    text = reference()
    for key in ("host", "max_loaded", "memory_budget", "ttl", "order", "args", "memory_limit"):
        assert f"| `{key}` |" in text
    assert "``" not in text
