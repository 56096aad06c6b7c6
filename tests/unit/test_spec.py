"""ServerSpec: validated once, turned into the llama-server command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from procman.errors import ConfigError, ModelError
from procman.models.refs import default_name, resolve_model
from procman.process.endpoint import Endpoint
from procman.spec import LogSettings, ServerSpec, parse_gpu_layers


def spec(**fields: object) -> ServerSpec:
    base: dict[str, object] = {
        "name": "demo",
        "model": Path("/m/model.gguf"),
        "binary": Path("/bin/llama-server"),
    }
    return ServerSpec(**(base | fields))  # type: ignore[arg-type]


SOCKET = Endpoint(socket="/run/demo-1234.sock")


def test_minimal_argv_listens_on_a_private_socket() -> None:
    assert spec().listen == "unix"
    assert spec().argv(SOCKET) == [
        "/bin/llama-server", "-m", "/m/model.gguf", "--host", "/run/demo-1234.sock",
        "--alias", "demo", "--cache-ram", "0", "--threads-http", "16", "--log-colors", "off",
    ]  # fmt: skip


def test_a_tcp_server_reads_its_key_from_a_file_never_argv() -> None:
    endpoint = Endpoint(port=4321, api_key="s3cret", key_file="/run/demo-1.key")
    argv = spec(listen="tcp").argv(endpoint)
    assert argv[3:9] == [
        "--host", "127.0.0.1", "--port", "4321", "--api-key-file", "/run/demo-1.key",
    ]  # fmt: skip
    assert "s3cret" not in " ".join(argv) and "s3cret" not in repr(endpoint)
    assert endpoint.auth() == [("Authorization", "Bearer s3cret")]


def test_listen_is_unix_or_tcp() -> None:
    with pytest.raises(ConfigError, match="listen"):
        spec(listen="udp")


def test_cache_ram_is_explicit_and_extra_args_win() -> None:
    assert spec().cache_ram_bytes == 0
    assert spec(cache_ram=64).cache_ram_bytes == 64 * 2**20
    none = spec(cache_ram=None)
    assert "--cache-ram" not in none.argv(SOCKET) and none.cache_ram_bytes == 8192 * 2**20
    given = spec(extra_args=("--cache-ram", "128"))
    assert given.argv(SOCKET).count("--cache-ram") == 1 and given.cache_ram_bytes == 128 * 2**20
    assert spec(extra_args=("-cram=-1",)).cache_ram_bytes == 8192 * 2**20


def test_full_argv_keeps_extra_args_last() -> None:
    argv = spec(
        aliases=("small",), ctx=2048, parallel=2, gpu_layers="all", extra_args=("-fa", "on")
    ).argv(SOCKET)
    assert argv[argv.index("--alias") + 1] == "demo,small"
    assert argv[argv.index("-c") + 1] == "2048"
    assert argv[argv.index("-np") + 1] == "2"
    assert argv[argv.index("-ngl") + 1] == "all"
    assert argv[-2:] == ["-fa", "on"]


@pytest.mark.parametrize("arg", ["--port", "--host=0.0.0.0", "-m", "--model", "--api-key"])
def test_extra_args_cannot_take_over_managed_options(arg: str) -> None:
    with pytest.raises(ConfigError, match="managed by llamactl"):
        spec(extra_args=(arg, "x"))


@pytest.mark.parametrize("name", ["", "a/b", "../x", "has space", "-dash"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError):
        spec(name=name)


def test_negative_sizes_and_timeouts_are_refused() -> None:
    with pytest.raises(ConfigError):
        spec(ctx=-1)
    with pytest.raises(ConfigError):
        spec(startup_timeout=0)


def test_log_path_follows_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert spec(log=LogSettings(directory=tmp_path)).log_path == tmp_path / "demo.log"
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    assert spec().log_path == tmp_path / "home" / "logs" / "demo.log"


@pytest.mark.parametrize(
    ("text", "parsed"), [(None, None), ("auto", "auto"), ("ALL", "all"), ("12", 12), ("0", 0)]
)
def test_gpu_layers_parsing(text: str | None, parsed: object) -> None:
    assert parse_gpu_layers(text) == parsed


def test_gpu_layers_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="gpu-layers"):
        parse_gpu_layers("many")


def test_resolve_model_demo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import buildtools.demo

    demo = tmp_path / "demo.gguf"
    monkeypatch.setattr(buildtools.demo, "demo_model_path", lambda: demo)
    assert resolve_model(None) == demo
    assert resolve_model("demo") == demo


def test_resolve_model_path_and_cache_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"GGUF")
    given = tmp_path / "x.gguf"
    given.write_bytes(b"GGUF")
    assert resolve_model(str(given), models_dir=models) == given
    assert resolve_model("tiny", models_dir=models) == models / "tiny.gguf"
    assert resolve_model("tiny.gguf", models_dir=models) == models / "tiny.gguf"
    with pytest.raises(ModelError, match="not found") as info:
        resolve_model("nope", models_dir=models)
    assert info.value.hint and "tiny.gguf" in info.value.hint


def test_default_names() -> None:
    assert default_name(Path("/x/SmolLM2.Q4_1.gguf"), "demo") == "demo"
    assert default_name(Path("/x/SmolLM2.Q4_1.gguf"), None) == "demo"
    assert default_name(Path("/x/SmolLM2.Q4_1.gguf"), "/x/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    assert default_name(Path("/x/my model (v2).gguf"), "p") == "my-model-v2"


@pytest.mark.parametrize(
    ("parallel", "extra", "slots"),
    [
        (None, (), 4),  # llama-server's own default ("auto")
        (2, (), 2),
        (None, ("-np", "8"), 8),
        (2, ("--parallel=6",), 6),  # the extra arguments come last: they win
        (None, ("-np", "-1"), 4),
        (None, ("-np",), 4),
    ],
)
def test_slots_are_what_llama_server_will_have(
    parallel: int | None, extra: tuple[str, ...], slots: int, tmp_path: Path
) -> None:
    spec = ServerSpec(
        name="m", model=tmp_path / "m.gguf", binary=tmp_path / "s", parallel=parallel,
        extra_args=extra,
    )  # fmt: skip
    assert spec.slots == slots


@pytest.mark.parametrize(
    ("parallel", "extra", "threads", "pipeline", "passed"),
    [
        (None, (), 16, 12, ["--threads-http", "16"]),  # 4 slots: 12 in flight, 4 spare threads
        (1, (), 7, 3, ["--threads-http", "7"]),
        (None, ("--threads-http", "20"), 20, 12, []),  # the user's own: passed as given
        (None, ("--threads-http=7",), 7, 3, []),  # fewer threads: fewer in flight
        (2, ("--threads-http", "2"), 2, 1, []),
        (None, ("--threads-http", "-1"), 8, 4, []),  # llama-server's auto: 4 slots + 4 at least
    ],
)
def test_the_router_never_keeps_more_connections_than_llama_server_has_threads(
    parallel: int | None,
    extra: tuple[str, ...],
    threads: int,
    pipeline: int,
    passed: list[str],
    tmp_path: Path,
) -> None:
    spec = ServerSpec(
        name="m", model=tmp_path / "m.gguf", binary=tmp_path / "s", parallel=parallel,
        extra_args=extra,
    )  # fmt: skip
    assert spec.http_threads == threads
    assert spec.pipeline == pipeline
    argv = spec.argv(SOCKET)
    assert argv.count("--threads-http") + sum(a.startswith("--threads-http=") for a in argv) == 1
    if passed:
        i = argv.index("--threads-http")
        assert argv[i : i + 2] == passed
