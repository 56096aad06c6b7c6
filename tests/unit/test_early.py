"""procman.process._early without processes: the record, its key, and when it is (not) trusted."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from buildtools.paths import home
from procman.models import _info_cache
from procman.process import _early, _sockets
from procman.process._early import Record


@pytest.fixture
def launch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_early, "_launch", _early._Launch())
    return tmp_path / "home"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def files(tmp_path: Path) -> tuple[Path, Path]:
    model, binary = tmp_path / "m.gguf", tmp_path / "llama-server"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return model, binary


def record_for(model: Path, binary: Path, **changes: object) -> Record:
    argv = [str(binary), "-m", str(model), "--host", "/run/x/m-1234.sock"]
    fields: dict[str, object] = {
        "argv": argv,
        "socket_index": 4,
        "model": str(model),
        "model_identity": _early.identity(model.stat()),
        "binary": str(binary),
        "binary_identity": _early.identity(binary.stat()),
        "public": ("127.0.0.1", free_port()),
        "min_available": 1,
        "cuda": False,
    }
    fields.update(changes)
    return Record(**fields)  # type: ignore[arg-type]


def store(args: list[str], record: Record) -> None:
    path = Path(_early.record_path(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record.encode())


# -- the record -----------------------------------------------------------------------------------
def test_a_record_survives_encoding_with_odd_arguments(tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    argv = ["/x/llama-server", "-m", "ü.gguf", "--p", "a b\tc", "", "--host", "/r/1.sock"]
    record = record_for(model, binary, argv=argv, socket_index=7)
    assert vars(Record.decode(record.encode())) == vars(record)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"llamactl-launch-0\0a\0b", b"llamactl-launch-1\0" * 3, b"\xff\xfe"],
)
def test_anything_but_a_record_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Record.decode(data)


def test_a_socket_index_outside_argv_is_refused(tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    with pytest.raises(ValueError, match="socket index"):
        Record.decode(record_for(model, binary, socket_index=99).encode())


# -- its key --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env",
    [
        {"LLAMACTL_HOME": "/srv/llamactl"},
        {"LLAMACTL_HOME": "~/x"},
        {"XDG_CACHE_HOME": "/tmp/xdg"},
        {},
    ],
)
def test_the_home_twin_agrees_with_buildtools(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("LLAMACTL_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Path(_sockets.home()) == home()


def test_the_key_is_the_arguments_directory_and_llamactl_settings(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["m.gguf", "--port", "8080"]
    first = _early.record_path(args)
    assert Path(first).parent == launch_home / "launches"
    assert _early.record_path(args) == first
    assert _early.record_path(["m.gguf", "--port", "8081"]) != first
    monkeypatch.setenv("UNRELATED", "1")
    assert _early.record_path(args) == first
    monkeypatch.setenv("LLAMACTL_SERVER", "/other/llama-server")
    assert _early.record_path(args) != first
    monkeypatch.delenv("LLAMACTL_SERVER")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relative model path means another file
    assert _early.record_path(args) != first


# -- when the record is trusted -------------------------------------------------------------------
def test_an_unchanged_record_is_used(launch_home: Path, tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary))
    loaded = _early._load(["x"])
    assert loaded is not None
    assert loaded.argv[4] == "/run/x/m-1234.sock"
    assert _early._load(["y"]) is None  # another command has no record


def test_a_rewritten_model_is_not_started_early(launch_home: Path, tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary))
    stat = model.stat()
    model.write_bytes(b"GGUF" + b"\1" * 60)  # same size, and the old mtime put back
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _early._load(["x"]) is None


@pytest.mark.parametrize("change", ["model gone", "binary replaced", "unreadable model"])
def test_a_changed_file_is_not_started_early(
    change: str, launch_home: Path, tmp_path: Path
) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary))
    if change == "model gone":
        model.unlink()
    elif change == "binary replaced":
        binary.unlink()
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    else:
        model.chmod(0o000)  # the ctime changes with the mode
    assert _early._load(["x"]) is None


def test_a_cuda_build_is_never_started_early(launch_home: Path, tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary, cuda=True))
    assert _early._load(["x"]) is None


def test_too_little_memory_is_not_started_early(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary, min_available=2 << 30))
    monkeypatch.setattr(_early, "_mem_available", lambda: 1 << 30)
    assert _early._load(["x"]) is None
    monkeypatch.setattr(_early, "_mem_available", lambda: 3 << 30)
    assert _early._load(["x"]) is not None


def test_a_busy_public_port_is_not_started_early(launch_home: Path, tmp_path: Path) -> None:
    model, binary = files(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        store(["x"], record_for(model, binary, public=("127.0.0.1", busy.getsockname()[1])))
        assert _early._load(["x"]) is None


def test_start_is_off_with_the_setting_and_never_raises(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, binary = files(tmp_path)
    store(["x"], record_for(model, binary))
    monkeypatch.setenv("LLAMACTL_EARLY_START", "0")
    _early.start(["x"])  # the autouse guard raises if anything is spawned
    assert _early.take() is None
    monkeypatch.delenv("LLAMACTL_EARLY_START")
    _early.start(["x"])  # spawning is refused by the guard here: swallowed, no early server
    assert _early.take() is None


# -- what is recorded -----------------------------------------------------------------------------
def remember(model: Path, binary: Path, socket: str = "/run/x/m-1.sock") -> None:
    _early.remember(
        argv=[str(binary), "-m", str(model), "--host", socket],
        socket=socket,
        model=str(model),
        binary=str(binary),
        public=("127.0.0.1", 8080),
        min_available=123,
        cuda=False,
    )


def test_only_a_model_gguf_validation_recorded_is_remembered(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, binary = files(tmp_path)
    _early._launch.args = ["m.gguf"]
    remember(model, binary)
    assert not (launch_home / "launches").exists()  # never validated: no record

    monkeypatch.setattr(_info_cache, "lookup", lambda key: object())  # validated
    remember(model, binary)
    (path,) = (launch_home / "launches").iterdir()
    assert path == Path(_early.record_path(["m.gguf"]))
    assert path.stat().st_mode & 0o077 == 0  # the command line may hold a key
    record = Record.decode(path.read_bytes())
    assert record.argv[record.socket_index] == "/run/x/m-1.sock"
    assert record.model_identity == _early.identity(model.stat())
    assert record.public == ("127.0.0.1", 8080)
    assert record.min_available == 123


def test_nothing_is_remembered_for_a_library_or_test_run(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, binary = files(tmp_path)
    monkeypatch.setattr(_info_cache, "lookup", lambda key: object())
    remember(model, binary)  # start() never ran: not launched as `llamactl serve`
    assert not (launch_home / "launches").exists()


def test_old_records_are_pruned(
    launch_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, binary = files(tmp_path)
    monkeypatch.setattr(_info_cache, "lookup", lambda key: object())
    monkeypatch.setattr(_early, "MAX_RECORDS", 3)
    for n in range(5):
        _early._launch.args = [f"m{n}.gguf"]
        remember(model, binary)
        path = Path(_early.record_path(_early._launch.args))
        os.utime(path, (n, n))  # distinct ages whatever the clock's resolution
    kept = sorted(p.name for p in (launch_home / "launches").iterdir())
    wanted = sorted(Path(_early.record_path([f"m{n}.gguf"])).name for n in (2, 3, 4))
    assert kept == wanted


def test_the_identity_is_the_one_model_validation_keys_on(tmp_path: Path) -> None:
    # the early start trusts a model whose identity equals the one recorded when gguf
    # validation passed: the two definitions (procman.models._info_cache imports too much for
    # the launch path to share it) must name the same fields
    model, _ = files(tmp_path)
    st = model.stat()
    assert _info_cache.file_key(model, st)[1:] == tuple(_early.identity(st))
