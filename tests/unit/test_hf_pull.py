"""``llamactl pull``: resolution, download, resume, checksum, errors, concurrency, free space.

Against :mod:`tests.hf_fake`, a loopback stand-in for the Hub endpoints
``huggingface_hub`` calls (``HF_ENDPOINT`` points at it), serving small but
real GGUF files; every pull goes through the real library.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from procman.errors import ModelError
from procman.models import _pulled
from procman.models.gguf import validate_model
from procman.models.hub import HfRef, choose_files, parse_hf_ref, quant_of
from procman.models.pull import PullError, PullProgress, cached, pull
from tests.hf_fake import GOOD_TOKEN, FakeHub, serve, tiny_gguf

REPO = "org/Tiny-GGUF"


@pytest.fixture
def models(tmp_path: Path) -> dict[str, bytes]:
    """Distinct real GGUF files (different names -> different bytes and checksums)."""
    made = tmp_path / "made"
    made.mkdir()
    return {n: tiny_gguf(made / f"{n}.gguf", name=n) for n in ("q4", "q8", "f16", "v1", "big")}


@pytest.fixture
def hub(models: dict[str, bytes]) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(
        REPO,
        {
            "tiny-Q4_K_M.gguf": models["q4"],
            "tiny-Q8_0.gguf": models["q8"],
            "sub/tiny-F16.gguf": models["f16"],
            "mmproj-tiny-F16.gguf": models["f16"],
            "README.md": b"# tiny\n",
        },
    )
    yield from serve(fake)


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import huggingface_hub.constants

    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))  # pulled.json
    # 10 MB chunks would make a half-way cut lose every byte of these small files
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 512)
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf")}


def storage(env: dict[str, str], repo: str = REPO) -> Path:
    return Path(env["HF_HUB_CACHE"]) / f"models--{repo.replace('/', '--')}"


# -- references ---------------------------------------------------------------------------------
def test_references_parse_into_repo_quant_file_and_revision() -> None:
    assert parse_hf_ref("hf:bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M") == HfRef(
        repo_id="bartowski/Qwen2.5-7B-Instruct-GGUF", quant="Q4_K_M"
    )
    assert parse_hf_ref("hf:o/r/sub/m-Q8_0.gguf@v1.0") == HfRef(
        repo_id="o/r", filename="sub/m-Q8_0.gguf", revision="v1.0"
    )
    ref = "hf:o/r:Q4_K_M@0123456789abcdef0123456789abcdef01234567"
    assert str(parse_hf_ref(ref)) == ref


@pytest.mark.parametrize(
    "bad", ["hf:", "hf:onlyorg", "hf:o/r:", "hf:o/r@", "hf:o/r/README.md", "hf:o/r/x.gguf:Q4"]
)
def test_malformed_references_say_how_to_write_one(bad: str) -> None:
    with pytest.raises(ModelError, match="invalid Hugging Face reference") as info:
        parse_hf_ref(bad)
    assert info.value.hint is not None and "hf:ORG/REPO" in info.value.hint


def test_a_quant_matches_a_whole_label_only() -> None:
    files = ["m-Q4_K.gguf", "m-Q4_K_M.gguf", "m-IQ4_XS.gguf", "mmproj-m-Q4_K_M.gguf"]
    assert choose_files(parse_hf_ref("hf:o/r:q4_k_m"), files) == ("m-Q4_K_M.gguf",)
    assert choose_files(parse_hf_ref("hf:o/r:Q4_K"), files) == ("m-Q4_K.gguf",)
    assert quant_of("Qwen2.5-7B-Instruct-Q5_K_S-00001-of-00002.gguf") == "Q5_K_S"


def test_none_or_several_matches_list_what_exists() -> None:
    files = ["a-Q8_0.gguf", "b-Q8_0.gguf", "a-Q2_K.gguf"]
    with pytest.raises(ModelError, match="has no Q4_K_M file") as none:
        choose_files(parse_hf_ref("hf:o/r:Q4_K_M"), files)
    assert "a-Q2_K.gguf" in none.value.message and "b-Q8_0.gguf" in none.value.message
    with pytest.raises(ModelError, match="2 files that match") as several:
        choose_files(parse_hf_ref("hf:o/r:Q8_0"), files)
    assert "a-Q8_0.gguf" in several.value.message
    with pytest.raises(ModelError, match="several models"):
        choose_files(parse_hf_ref("hf:o/r"), files)
    assert choose_files(parse_hf_ref("hf:o/r"), ["x-Q8_0.gguf", "x-Q4_K_M.gguf"]) == (
        "x-Q4_K_M.gguf",  # llama.cpp's -hf default when several are published
    )


def test_a_split_model_is_chosen_whole_first_part_first() -> None:
    parts = [f"big/m-Q4_K_M-0000{i}-of-00003.gguf" for i in (3, 1, 2)]
    chosen = choose_files(parse_hf_ref("hf:o/r:Q4_K_M"), [*parts, "m-Q8_0.gguf"])
    assert chosen == tuple(sorted(parts))
    with pytest.raises(ModelError, match="incomplete"):
        choose_files(parse_hf_ref("hf:o/r:Q4_K_M"), parts[:2])


# -- downloads ----------------------------------------------------------------------------------
def test_pull_by_quant_lands_in_the_hf_cache_layout(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    stages: list[str] = []
    pulled = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env, on_progress=lambda p: stages.append(p.stage))
    assert pulled.files == ("tiny-Q4_K_M.gguf",)
    assert pulled.path.read_bytes() == models["q4"]
    assert pulled.downloaded_bytes == len(models["q4"])
    root = storage(env)
    assert pulled.path == root / "snapshots" / pulled.commit / "tiny-Q4_K_M.gguf"
    assert pulled.path.is_symlink() and pulled.path.resolve().parent == root / "blobs"
    assert (root / "refs" / "main").read_text() == pulled.commit
    assert not list((root / "blobs").glob("*.incomplete"))
    assert validate_model(pulled.path).name == "q4"
    assert stages[0] == "waiting" and "downloading" in stages and stages[-1] == "verifying"
    assert [r["ref"] for r in _pulled.load()] == ["hf:org/Tiny-GGUF:Q4_K_M"]
    # again: the cache answers, nothing is fetched
    again = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env)
    assert again.path == pulled.path and again.downloaded_bytes == 0
    assert len(hub.gets("tiny-Q4_K_M.gguf")) == 1


def test_the_library_finds_what_pull_wrote(env: dict[str, str], models: dict[str, bytes]) -> None:
    from huggingface_hub import hf_hub_download

    pulled = pull("hf:org/Tiny-GGUF/sub/tiny-F16.gguf", env=env)
    found = hf_hub_download(
        REPO, "sub/tiny-F16.gguf", cache_dir=env["HF_HUB_CACHE"], local_files_only=True
    )
    assert Path(found) == pulled.path and Path(found).read_bytes() == models["f16"]


def test_pull_by_revision(hub: FakeHub, env: dict[str, str], models: dict[str, bytes]) -> None:
    old = hub.add(REPO, {"tiny-Q4_K_M.gguf": models["v1"]}, commit="1" * 40, refs=("v1",))
    by_tag = pull("hf:org/Tiny-GGUF:Q4_K_M@v1", env=env)
    assert by_tag.commit == old and by_tag.path.read_bytes() == models["v1"]
    assert (storage(env) / "refs" / "v1").read_text() == old
    by_commit = pull(f"hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf@{old}", env=env)
    assert by_commit.path == by_tag.path and by_commit.downloaded_bytes == 0
    latest = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env)
    assert latest.commit != old and latest.path.read_bytes() == models["q4"]


def test_a_split_model_is_fetched_whole(hub: FakeHub, env: dict[str, str]) -> None:
    parts = {f"m-Q4_K_M-0000{i}-of-00003.gguf": bytes([i]) * 1000 for i in (1, 2, 3)}
    hub.add("org/split", parts)
    pulled = pull("hf:org/split:Q4_K_M", env=env)
    assert pulled.files == tuple(sorted(parts)) and pulled.path.name.endswith("00001-of-00003.gguf")
    assert all(p.read_bytes() == parts[p.name] for p in pulled.paths)
    assert pulled.size_bytes == 3000


def test_a_connection_cut_half_way_resumes_where_it_stopped(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.fault.cut = 1
    pulled = pull("hf:org/Tiny-GGUF:Q8_0", env=env)
    assert pulled.path.read_bytes() == models["q8"]
    first, second = hub.gets("tiny-Q8_0.gguf")
    assert first == "" and second.startswith("bytes=") and second != "bytes=0-"


def test_an_interrupted_pull_is_resumed_by_the_next_one_and_never_taken_as_a_model(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.fault.cut, hub.fault.unavailable = 1, 100  # cut half-way, then the Hub stays down
    with pytest.raises(PullError, match="HTTP 503") as info:
        pull("hf:org/Tiny-GGUF:Q8_0", env=env)
    assert info.value.hint is not None and "resumed" in info.value.hint
    (partial,) = (storage(env) / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < len(models["q8"])
    assert cached("hf:org/Tiny-GGUF:Q8_0", cache_dir=Path(env["HF_HUB_CACHE"])) is None
    assert not (storage(env) / "snapshots").exists()

    hub.fault.unavailable = 0
    pulled = pull("hf:org/Tiny-GGUF:Q8_0", env=env)
    assert hub.gets("tiny-Q8_0.gguf")[-1] == f"bytes={kept}-"
    assert pulled.path.read_bytes() == models["q8"]
    assert pulled.downloaded_bytes == len(models["q8"]) - kept
    assert not partial.exists()


def test_a_corrupted_byte_is_caught_and_nothing_is_kept(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.fault.corrupt_at = len(models["q4"]) // 2
    with pytest.raises(PullError, match="corrupt") as info:
        pull("hf:org/Tiny-GGUF:Q4_K_M", env=env)
    assert "deleted" in info.value.message
    assert not list((storage(env) / "blobs").iterdir())
    assert not (storage(env) / "snapshots").exists()
    assert _pulled.load() == []
    hub.fault.corrupt_at = None
    assert pull("hf:org/Tiny-GGUF:Q4_K_M", env=env).path.read_bytes() == models["q4"]


@pytest.mark.parametrize(
    ("setup", "token", "message", "hint"),
    [
        ("private", None, "not found", "HF_TOKEN set"),
        ("private", "hf_wrong", "refused the token", "wrong or expired"),
        ("gated", None, "is gated", "accept the conditions"),
        ("missing", None, "not found", "check ORG/REPO"),
    ],
)
def test_401_and_404_are_clear_errors_that_write_nothing(
    hub: FakeHub,
    env: dict[str, str],
    models: dict[str, bytes],
    setup: str,
    token: str | None,
    message: str,
    hint: str,
) -> None:
    if setup != "missing":
        hub.add("org/locked", {"m-Q4_K_M.gguf": models["q4"]}, **{setup: True})
    if token:
        env["HF_TOKEN"] = token
    with pytest.raises(PullError, match=message) as info:
        pull("hf:org/locked:Q4_K_M", env=env)
    assert info.value.hint is not None and hint in info.value.hint
    assert not storage(env, "org/locked").exists()


def test_the_right_token_opens_a_private_repo(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.add("org/locked", {"m-Q4_K_M.gguf": models["q4"]}, private=True)
    env["HF_TOKEN"] = GOOD_TOKEN
    assert pull("hf:org/locked", env=env).path.read_bytes() == models["q4"]


def test_the_token_goes_to_the_hub_and_never_to_the_cdn_it_redirects_to(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.add("org/locked", {"m-Q4_K_M.gguf": models["q4"]}, private=True)
    hub.fault.redirect_host = "localhost"  # the same fake under another name: another host
    env["HF_TOKEN"] = GOOD_TOKEN
    assert pull("hf:org/locked", env=env).path.read_bytes() == models["q4"]
    sent = dict(hub.auth)
    assert sent["/api/models/org/locked"] == f"Bearer {GOOD_TOKEN}"
    (cdn,) = [path for path in sent if path.startswith("/cdn/")]
    assert sent[cdn] == ""


def test_an_unknown_revision_or_quant_is_a_clear_error(env: dict[str, str]) -> None:
    with pytest.raises(PullError, match="no revision 'nope'"):
        pull("hf:org/Tiny-GGUF:Q4_K_M@nope", env=env)
    with pytest.raises(ModelError, match="has no Q2_K file") as info:
        pull("hf:org/Tiny-GGUF:Q2_K", env=env)
    assert "tiny-Q8_0.gguf" in info.value.message


def test_no_network_is_a_clear_error_unless_the_cache_has_it(env: dict[str, str]) -> None:
    down = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: connection refused
    with pytest.raises(PullError, match="unreachable"):
        pull("hf:org/Tiny-GGUF:Q4_K_M", env=down)
    assert not storage(env).exists()
    pulled = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env)
    assert pull("hf:org/Tiny-GGUF:Q4_K_M", env=down).path == pulled.path


def test_offline_mode_uses_the_cache_and_never_the_network(
    hub: FakeHub, env: dict[str, str]
) -> None:
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    with pytest.raises(PullError, match="offline mode"):
        pull("hf:org/Tiny-GGUF:Q4_K_M", env=offline)
    assert hub.requests == []
    pulled = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env)
    seen = len(hub.requests)
    assert pull("hf:org/Tiny-GGUF:Q4_K_M", env=offline).path == pulled.path
    assert len(hub.requests) == seen


def test_two_concurrent_pulls_of_one_file_end_with_one_copy(
    hub: FakeHub, env: dict[str, str], models: dict[str, bytes]
) -> None:
    hub.fault.before_body = threading.Event()  # holds the first download until both wait
    waiting: list[threading.Event] = [threading.Event(), threading.Event()]
    results: list[Path | BaseException] = [Path(), Path()]

    def run(i: int) -> None:
        def seen(p: PullProgress) -> None:
            if p.stage == "waiting":
                waiting[i].set()

        try:
            results[i] = pull("hf:org/Tiny-GGUF:Q4_K_M", env=env, on_progress=seen).path
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    assert all(w.wait(30) for w in waiting)
    hub.fault.before_body.set()
    for t in threads:
        t.join(30)
    assert results[0] == results[1] and isinstance(results[0], Path)
    assert results[0].read_bytes() == models["q4"]
    assert len(hub.gets("tiny-Q4_K_M.gguf")) == 1
    assert len(list((storage(env) / "blobs").iterdir())) == 1


def test_not_enough_free_space_is_refused_before_the_first_byte(
    hub: FakeHub, env: dict[str, str]
) -> None:
    asked: list[Path] = []

    def tiny_disk(path: Path) -> int:
        asked.append(path)
        return 1024 * 1024

    with pytest.raises(PullError, match="not enough free disk space") as info:
        pull("hf:org/Tiny-GGUF:Q4_K_M", env=env, free_space=tiny_disk)
    assert info.value.hint is not None and "HF_HUB_CACHE" in info.value.hint
    assert asked and hub.gets("tiny-Q4_K_M.gguf") == []
    assert not storage(env).exists()


# -- the CLI, the config and the supervisor ------------------------------------------------------
@pytest.fixture
def cli_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no real LM Studio/Ollama store
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)


@pytest.mark.usefixtures("cli_env")
def test_pull_models_and_rm_from_the_command_line(
    env: dict[str, str], models: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import hf_hub_download

    from procman.cli import main

    # a file another tool put in the cache: listed, never removed by llamactl
    theirs = hf_hub_download(
        REPO, "tiny-Q8_0.gguf", cache_dir=env["HF_HUB_CACHE"], endpoint=env["HF_ENDPOINT"]
    )
    assert main(["pull", "hf:org/Tiny-GGUF:Q4_K_M"]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.read_bytes() == models["q4"] and "checksum verified" in err
    assert main(["models", "--json"]) == 0
    rows = {r["ref"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf"]["source"] == "pulled"
    assert rows["hf:org/Tiny-GGUF/tiny-Q8_0.gguf"]["source"] == "hf-cache"
    assert main(["models", "rm", "hf:org/Tiny-GGUF/tiny-Q8_0.gguf"]) == 1
    assert "not pulled by llamactl" in capsys.readouterr().err
    assert main(["models", "rm", "hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf"]) == 0
    assert not path.exists() and not path.is_symlink()
    assert not list((storage(env) / "blobs").glob(f"{hashlib.sha256(models['q4']).hexdigest()}*"))
    assert Path(theirs).read_bytes() == models["q8"]
    assert _pulled.load() == []


@pytest.mark.usefixtures("cli_env")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull", "org/Tiny-GGUF"], "only Hugging Face models are pulled"),
        (["pull", "hf:org/nothing-here"], "repository org/nothing-here not found"),
        (["pull", "hf:org/Tiny-GGUF:Q3_K_S"], "has no Q3_K_S file"),
        (["estimate", "hf:org/Tiny-GGUF@nope"], "has no revision 'nope'"),
    ],
)
def test_bad_references_exit_1_with_a_message_and_a_hint(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from procman.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err


@pytest.mark.usefixtures("cli_env")
def test_estimate_takes_a_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from procman.cli import main

    assert main(["estimate", "--json", "hf:org/Tiny-GGUF/sub/tiny-F16.gguf"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["name"] == "f16" and Path(doc["model"]["path"]).parent.name == "blobs"


@pytest.mark.usefixtures("cli_env")
async def test_a_config_model_is_pulled_at_its_first_load(tmp_path: Path) -> None:
    from procman.config import parse_config
    from procman.events import Event
    from procman.memory.budget import MachineMemory, OverBudget
    from procman.models.refs import resolve_model
    from procman.supervisor import AsyncSupervisor

    ref = "hf:org/Tiny-GGUF:Q4_K_M"
    plan = parse_config({"models": {"chat": {"path": ref}}}).plan(tmp_path / "llama-server")
    (model,) = plan.models
    assert model.pull == ref and not model.spec.model.exists()  # nothing fetched yet
    events: list[Event] = []
    rows: list[object] = []
    machine = MachineMemory(total_bytes=16 << 30, available_bytes=8 << 30)
    # a 1-byte budget stops the start right after admission: no process in a unit test
    async with AsyncSupervisor(memory_budget=1, machine=machine) as supervisor:
        supervisor.bus.subscribe(events.append)
        supervisor.bus.subscribe(lambda e: rows.append(supervisor.status()[0]["pulling"]))

        def fetch(report: object) -> Path:
            return resolve_model(ref, on_progress=report)  # type: ignore[arg-type]

        server = supervisor.add(model.spec, validate=False, on_demand=True, fetch=fetch)
        with pytest.raises(OverBudget):
            await supervisor.load("chat")
        assert server.spec.model.is_file() and server.spec.model.name == "tiny-Q4_K_M.gguf"
        assert supervisor.status()[0]["pulling"] is None
    reasons = [e.reason for e in events]
    assert reasons[0] == f"pulling {ref}"
    assert any("downloading 100%" in r for r in reasons)
    assert any(r.startswith(f"pulled {ref}: ") for r in reasons)
    assert any(isinstance(r, str) and r.startswith(f"pulling {ref}") for r in rows)
    log = server.spec.log_path.read_text()  # `llamactl logs chat` shows the download too
    assert f"pulling {ref}" in log and "downloading 100%" in log and f"pulled {ref}" in log
    # the next plan finds it in the cache: nothing left to pull
    (again,) = parse_config({"models": {"chat": {"path": ref}}}).plan(tmp_path / "x").models
    assert again.pull is None and again.spec.model == server.spec.model


async def test_a_failed_pull_is_reported_and_raised(tmp_path: Path) -> None:
    from procman.events import Event
    from procman.spec import LogSettings, ServerSpec
    from procman.supervisor import AsyncSupervisor

    events: list[Event] = []

    def fetch(report: object) -> Path:
        raise PullError("cannot download hf:o/r: the Hub is unreachable")

    spec = ServerSpec(
        name="m",
        model=Path("hf:o/r"),
        binary=tmp_path / "llama-server",
        log=LogSettings(directory=tmp_path),
    )
    async with AsyncSupervisor() as supervisor:
        supervisor.bus.subscribe(events.append)
        supervisor.add(spec, validate=False, on_demand=True, fetch=fetch)
        with pytest.raises(PullError, match="unreachable"):
            await supervisor.load("m")
        assert supervisor.status()[0]["pulling"] is None
    assert events[-1].reason == "pull failed: cannot download hf:o/r: the Hub is unreachable"
    assert "pull failed: cannot download" in (tmp_path / "m.log").read_text()


@pytest.mark.usefixtures("cli_env")
def test_the_library_serve_request_resolves_a_reference(
    tmp_path: Path, models: dict[str, bytes]
) -> None:
    from procman.daemon._request import ServeRequest

    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    spec = ServeRequest(model="hf:org/Tiny-GGUF:Q8_0", binary=str(binary)).to_spec()
    assert spec.model.read_bytes() == models["q8"] and spec.name == "tiny-Q8_0"
