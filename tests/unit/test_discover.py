"""Models other tools keep: fixture trees laid out as each tool writes them, real GGUF headers.

The layouts: the Hugging Face cache as ``huggingface_hub`` writes it
(``blobs/<sha256>``, ``snapshots/<commit>/FILE`` relative links, ``refs/main``);
LM Studio's ``models/PUBLISHER/REPO/FILE.gguf``; Ollama's
``manifests/REGISTRY/NAMESPACE/MODEL/TAG`` JSON naming ``blobs/sha256-HEX``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from procman.cli import main
from procman.errors import ModelError
from procman.models.discover import (
    Source,
    Stores,
    default_stores,
    find_models,
    resolve_lmstudio,
    resolve_ollama,
)
from procman.models.gguf import validate_model
from procman.models.refs import default_name, resolve_model
from tests.hf_fake import tiny_gguf

MAIN = "a" * 40
OLD = "b" * 40


def hf_file(cache: Path, repo: str, commit: str, name: str, data: bytes) -> Path:
    storage = cache / f"models--{repo.replace('/', '--')}"
    blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = storage / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def ollama_model(root: Path, name: str, tag: str, data: bytes | None, *, ns: str = "library",
                 registry: str = "registry.ollama.ai") -> Path:  # fmt: skip
    digest = hashlib.sha256(data or b"missing").hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        blob.write_bytes(data)
    config = root / "blobs" / f"sha256-{'c' * 64}"
    config.write_text("{}")
    manifest = root / "manifests" / registry / ns / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
         "size": len(data or b"missing")},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "d" * 64,
         "size": 10},
    ]  # fmt: skip
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": f"sha256:{'c' * 64}",
                    "size": 2,
                },
                "layers": layers,
            }
        )
    )
    return blob


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder holding every tool's store, with real (tiny) GGUF files."""
    user = tmp_path / "user"
    made = tmp_path / "made"
    made.mkdir()
    gguf = {n: tiny_gguf(made / f"{n}.gguf", name=n) for n in ("hf", "old", "lms", "oll", "dir")}
    cache = user / ".cache" / "huggingface" / "hub"
    hf_file(cache, "org/Tiny-GGUF", MAIN, "tiny-Q4_K_M.gguf", gguf["hf"])
    hf_file(cache, "org/Tiny-GGUF", MAIN, "mmproj-tiny-F16.gguf", b"GGUF projector")
    hf_file(cache, "org/Tiny-GGUF", OLD, "tiny-Q8_0.gguf", gguf["old"])
    hf_file(cache, "org/Tiny-GGUF", OLD, "tiny-Q4_K_M.gguf", gguf["hf"])  # same blob: listed once
    for i in (1, 2):
        hf_file(cache, "org/split", MAIN, f"s-Q4_K_M-0000{i}-of-00002.gguf", gguf["dir"] + bytes(i))
    (cache / "models--org--Tiny-GGUF" / "refs").mkdir()
    (cache / "models--org--Tiny-GGUF" / "refs" / "main").write_text(MAIN)
    (cache / "models--org--split" / "refs").mkdir()
    (cache / "models--org--split" / "refs" / "main").write_text(MAIN)
    partial = cache / "models--org--Tiny-GGUF" / "blobs" / f"{'e' * 64}.incomplete"
    partial.write_bytes(gguf["hf"][:100])  # a download in progress: never listed
    lms = user / ".lmstudio" / "models" / "lmstudio-community" / "Tiny-GGUF"
    lms.mkdir(parents=True)
    (lms / "Tiny-Q4_K_M.gguf").write_bytes(gguf["lms"])
    ollama = user / ".ollama" / "models"
    ollama_model(ollama, "tiny", "3b", gguf["oll"])
    ollama_model(ollama, "Tiny-GGUF", "Q4_K_M", gguf["oll"], ns="org", registry="hf.co")
    ollama_model(ollama, "gone", "latest", None)  # its blob was removed
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "own.gguf").write_bytes(gguf["dir"])
    for var in ("HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME",
                "OLLAMA_MODELS"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(user))
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "llamactl"))
    return tmp_path


def test_every_store_is_found_and_each_file_once(machine: Path) -> None:
    stores = default_stores(folders=(machine / "mine",))
    found = {f.ref: f for f in find_models(stores)}
    assert set(found) == {
        "hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf",
        f"hf:org/Tiny-GGUF/tiny-Q8_0.gguf@{OLD}",
        "hf:org/split/s-Q4_K_M-00001-of-00002.gguf",
        "lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf",
        "ollama:tiny:3b",
        str(machine / "mine" / "own.gguf"),
    }
    assert found["hf:org/split/s-Q4_K_M-00001-of-00002.gguf"].parts == 2
    assert found["ollama:tiny:3b"].source is Source.OLLAMA
    # the hf.co Ollama model is the same blob as ollama:tiny:3b: listed once
    blob = found["ollama:tiny:3b"].path
    assert blob.parent.name == "blobs" and blob.name.startswith("sha256-")
    for f in found.values():
        assert validate_model(f.path).architecture == "llama"


def test_each_reference_resolves_to_the_tools_own_file(machine: Path) -> None:
    user = machine / "user"
    stores = default_stores()
    blob = resolve_ollama("ollama:tiny:3b", stores)
    assert blob.read_bytes()[:4] == b"GGUF" and validate_model(blob).name == "oll"
    assert resolve_ollama("ollama:hf.co/org/Tiny-GGUF:Q4_K_M", stores) == blob
    assert resolve_model("ollama:tiny:3b") == blob
    lms = resolve_lmstudio("lmstudio:lmstudio-community/Tiny-GGUF", stores)
    assert lms == user / ".lmstudio/models/lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf"
    assert resolve_model("lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q4_K_M.gguf") == lms
    hf = resolve_model("hf:org/Tiny-GGUF:Q4_K_M")  # from the cache: no network, no pull
    assert hf.parent.name == MAIN and validate_model(hf).name == "hf"
    assert resolve_model(f"hf:org/Tiny-GGUF:Q8_0@{OLD}").parent.name == OLD
    assert default_name(blob, "ollama:tiny:3b") == "tiny-3b"


def test_missing_models_list_what_the_store_has(machine: Path) -> None:
    with pytest.raises(ModelError, match=r"Ollama model tiny:7b not found") as info:
        resolve_model("ollama:tiny:7b")
    assert info.value.hint is not None and "ollama:tiny:3b" in info.value.hint
    with pytest.raises(ModelError, match="not a GGUF model llamactl can serve"):
        resolve_model("ollama:gone")
    with pytest.raises(ModelError, match="LM Studio model nobody/x not found") as lms:
        resolve_model("lmstudio:nobody/x")
    assert lms.value.hint is not None and "lmstudio-community/Tiny-GGUF" in lms.value.hint


def test_ollama_models_env_and_lm_studio_settings_move_the_stores(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = machine / "elsewhere"
    monkeypatch.setenv("OLLAMA_MODELS", str(elsewhere / "ollama"))
    settings = machine / "user" / ".lmstudio" / "settings.json"
    settings.write_text(json.dumps({"downloadsFolder": str(elsewhere / "lms")}))
    stores = default_stores()
    assert stores.ollama == (elsewhere / "ollama",)
    assert stores.lmstudio[0] == elsewhere / "lms"
    assert not any(f.source is Source.OLLAMA for f in find_models(stores))


def test_models_json_describes_each_model(
    machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--json", "--dir", str(machine / "mine")]) == 0
    rows = {r["ref"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["ollama:tiny:3b"]
    assert row["source"] == "ollama" and row["architecture"] == "llama"
    assert row["name"] == "oll" and row["quantization"] == "F32"
    assert row["parameters"] == 32 * 16 * 2 + 2 * 16 * 16  # the tensors tiny_gguf writes
    assert row["size_bytes"] == Path(row["path"]).stat().st_size
    assert row["estimate"]["ctx"] == 256 and row["estimate"]["host_bytes"] > row["size_bytes"]
    split = rows["hf:org/split/s-Q4_K_M-00001-of-00002.gguf"]
    assert split["size_bytes"] == sum(
        p.stat().st_size for p in Path(split["path"]).parent.glob("s-*")
    )
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "ollama:tiny:3b" in table and "RAM @4096" in table


def test_models_rm_refuses_what_llamactl_did_not_download(
    machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = "hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf"
    assert main(["models", "rm", ref]) == 1
    assert "was not pulled by llamactl" in capsys.readouterr().err
    assert resolve_model("hf:org/Tiny-GGUF:Q4_K_M").is_file()


def test_stores_that_do_not_exist_are_skipped(tmp_path: Path) -> None:
    stores = Stores(
        hf_cache=tmp_path / "no-hf", lmstudio=(tmp_path / "no-lms",), ollama=(tmp_path / "x",)
    )
    assert find_models(stores) == []


def write_split(folder: Path) -> list[Path]:
    """A two-part model as gguf-split lays it out: the metadata and some weights in part 1."""
    import gguf
    import numpy as np

    paths = [folder / f"m-Q4_K_M-0000{i}-of-00002.gguf" for i in (1, 2)]
    tensors = [
        {"token_embd.weight": (32, 16), "blk.0.attn_q.weight": (16, 16)},
        {"blk.1.attn_q.weight": (16, 16), "output.weight": (32, 16)},
    ]
    for i, (path, names) in enumerate(zip(paths, tensors, strict=True)):
        w = gguf.GGUFWriter(str(path), "llama")
        if i == 0:
            w.add_name("split")
            w.add_block_count(2)
            w.add_context_length(256)
            w.add_embedding_length(16)
            w.add_head_count(2)
        w.add_uint16("split.no", i)
        w.add_uint16("split.count", 2)
        w.add_int32("split.tensors.count", 4)
        for name, shape in names.items():
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return paths


def test_a_split_model_counts_every_part(tmp_path: Path) -> None:
    first, second = write_split(tmp_path)
    info = validate_model(first)
    assert info.size_bytes == first.stat().st_size + second.stat().st_size
    assert info.n_params == 2 * 32 * 16 + 2 * 16 * 16
    assert all(layer > 0 for layer in info.layer_tensor_bytes)  # blk.1 lives in part 2
    assert info.output_tensor_bytes == 32 * 16 * 4
    second.unlink()
    os.utime(first)  # a new identity: validated again, not answered from memory
    with pytest.raises(ModelError, match=r"00002-of-00002\.gguf is missing") as info_missing:
        validate_model(first)
    assert info_missing.value.hint is not None and "every part" in info_missing.value.hint


def test_models_lists_the_folders_a_config_names(
    machine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[server]\nmodel_dirs = ["{machine / "mine"}"]\n\n[models.a]\npath = "demo"\n'
    )
    assert main(["models", "--json", "--config", str(config)]) == 0
    rows = {r["ref"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[str(machine / "mine" / "own.gguf")]["source"] == "folder"
    assert main(["models", "--json"]) == 0
    assert str(machine / "mine" / "own.gguf") not in capsys.readouterr().out
