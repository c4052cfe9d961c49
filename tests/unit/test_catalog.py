from pathlib import Path

import pytest

from vllm_obtain.weights.catalog import (
    ModelResolutionError,
    load_catalog,
    model_format,
    resolve_model,
)


def resolve(name, tmp_path: Path):
    return resolve_model(
        name,
        engine="llama.cpp",
        reads="gguf",
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )


def test_every_alias_has_a_source_for_every_engine():
    catalog = load_catalog()
    assert catalog["default"] in catalog["models"]
    for alias, entry in catalog["models"].items():
        source = entry["llama.cpp"]
        assert "package" in source or ("repo" in source and "file" in source), alias
        for engine in ("vllm", "mlx"):
            assert "repo" in entry[engine] or entry[engine] == {"convert": "llama.cpp"}, alias


def test_formats_decide_which_engines_can_serve(tmp_path):
    (tmp_path / "models" / "hf-model").mkdir(parents=True)
    (tmp_path / "models" / "hf-model" / "config.json").write_text("{}")
    (tmp_path / "models" / "file.gguf").write_bytes(b"GGUF")
    assert model_format("qwen-0.5b", tmp_path / "models") == "alias"
    assert model_format(None, tmp_path / "models") == "alias"
    assert model_format("hf-model", tmp_path / "models") == "hf"
    assert model_format("file", tmp_path / "models") == "gguf"


def test_a_hugging_face_directory_is_served_by_vllm_or_mlx_not_llama_cpp(tmp_path):
    (tmp_path / "models" / "My-HF").mkdir(parents=True)
    (tmp_path / "models" / "My-HF" / "config.json").write_text("{}")
    resolved = resolve_model(
        "My-HF",
        engine="vllm",
        reads="hf",
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )
    assert resolved.id == "my-hf"
    assert resolved.path == tmp_path / "models" / "My-HF"
    with pytest.raises(ModelResolutionError, match="needs a GGUF file"):
        resolve("My-HF", tmp_path)


def test_hub_repository_alias_for_vllm_is_served_from_a_populated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    repo = load_catalog()["models"]["qwen-0.5b"]["vllm"]["repo"]
    repo_dir = tmp_path / "cache" / "huggingface" / f"models--{repo.replace('/', '--')}"
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    (repo_dir / "snapshots" / revision).mkdir(parents=True)
    (repo_dir / "snapshots" / revision / "config.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    resolved = resolve_model(
        "qwen-0.5b",
        engine="vllm",
        reads="hf",
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )
    assert (resolved.path / "config.json").is_file()


def test_a_gguf_path_is_served_under_its_file_name(tmp_path):
    model = tmp_path / "My-Model.Q4.gguf"
    model.write_bytes(b"GGUF")
    resolved = resolve(str(model), tmp_path)
    assert resolved.id == "my-model.q4"
    assert resolved.path == model


def test_a_name_in_the_models_directory_is_found(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "local.gguf").write_bytes(b"GGUF")
    assert resolve("local", tmp_path).path == tmp_path / "models" / "local.gguf"


def test_unknown_name_lists_the_aliases(tmp_path):
    with pytest.raises(ModelResolutionError, match=r"qwen-0\.5b"):
        resolve("no-such-model", tmp_path)


def test_default_alias_resolves_to_the_embedded_gguf(tmp_path):
    pytest.importorskip("llama_cpp", reason="the embedded model is installed with the engine")
    resolved = resolve(None, tmp_path)
    assert resolved.id == "smollm2-135m-instruct"
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolved.path.stat().st_size > 50_000_000


def test_hub_alias_is_served_from_a_populated_cache_offline(tmp_path, monkeypatch):
    """The real huggingface_hub download path, on a cache laid out as the Hub client does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    source = load_catalog()["models"]["qwen-0.5b"]["llama.cpp"]
    repo_dir = tmp_path / "cache" / "huggingface" / f"models--{source['repo'].replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / source["file"]).write_bytes(b"GGUF cached")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)

    resolved = resolve("qwen-0.5b", tmp_path)
    assert resolved.id == "qwen-0.5b"
    assert resolved.path.read_bytes() == b"GGUF cached"


def test_a_file_placed_in_models_wins_over_the_hub(tmp_path):
    source = load_catalog()["models"]["qwen-0.5b"]["llama.cpp"]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / source["file"]).write_bytes(b"local")
    assert resolve("qwen-0.5b", tmp_path).path.read_bytes() == b"local"
