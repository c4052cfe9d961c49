"""Fetching a model onto this machine: a catalogue alias, a Hugging Face repo (org/name, or
org/name:QUANT for one GGUF of it) or the URL of a .gguf file; with progress, resumed after a
dropped connection, checked against its sha256, and never half-visible to the server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vllm_obtain.weights.catalog import ModelResolutionError, load_catalog, packaged_file
from vllm_obtain.weights.inventory import (
    InstalledModel,
    find_installed,
    hub_cache_dir,
)
from vllm_obtain.weights.pull_checks import (
    Progress,
    PullError,
    PullProgress,
    report_done,
    sha256_digest,
    verify,
)
from vllm_obtain.weights.pull_guard import STRICT, PullPolicy
from vllm_obtain.weights.pull_hub import fetch_files, pull_repo, repo_listing
from vllm_obtain.weights.pull_url import pull_url

__all__ = ["PullError", "PullPolicy", "PullProgress", "pull"]
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")


def pull(
    name: str,
    *,
    models_dir: Path,
    cache_dir: Path,
    sha256: str | None = None,
    on_progress: Progress = lambda p: None,
    policy: PullPolicy = STRICT,
) -> InstalledModel:
    """Fetch `name` (an alias, org/name[:QUANT], or an http(s) URL of a .gguf file) unless it is
    here already; blocking. `on_progress` may be called from a helper thread. `policy` guards
    URLs (https, public addresses, a size cap: the client of /admin/pull picks the URL); the
    Hub is reached through huggingface_hub as it is."""
    name = name.strip()
    expected = sha256_digest(sha256, "--sha256") if sha256 else None
    on_progress(PullProgress("resolving", name, 0, None))
    if name.startswith(("https://", "http://")):
        path = pull_url(name, models_dir, expected, on_progress, policy)
        return _installed(path.name, models_dir, cache_dir)
    spec = load_catalog()["models"].get(name)
    if spec is not None:
        _pull_alias(name, spec, models_dir, cache_dir, expected, on_progress)
        return _installed(name, models_dir, cache_dir)
    repo, _, quant = name.removeprefix("hf.co/").removeprefix("huggingface.co/").partition(":")
    if not _REPO.match(repo):
        known = ", ".join(sorted(load_catalog()["models"]))
        raise PullError(
            f"'{name}' is not an alias ({known}), a Hugging Face repo (org/name or "
            "org/name:QUANT) or the http(s) URL of a .gguf file"
        )
    model_id = pull_repo(repo, quant.upper(), cache_dir, expected, on_progress)
    return _installed(model_id, models_dir, cache_dir)


def _installed(name: str, models_dir: Path, cache_dir: Path) -> InstalledModel:
    model = find_installed(name, models_dir, cache_dir)
    if model is None:  # the inventory and pull disagree about where files go
        raise PullError(f"'{name}' was fetched but is not found among the installed models")
    return model


def _pull_alias(
    alias: str,
    spec: dict[str, Any],
    models_dir: Path,
    cache_dir: Path,
    expected: str | None,
    on_progress: Progress,
) -> None:
    source = spec.get("llama.cpp") or {}
    if "package" in source:  # the embedded model: installed with its pip package
        try:
            path = packaged_file(source["package"], source["file"])
        except ModelResolutionError as exc:
            raise PullError(str(exc)) from exc
        report_done(path.name, path.stat().st_size, on_progress)
        return
    if "file" not in source:
        raise PullError(f"'{alias}' has no GGUF file in the catalogue to pull")
    local = models_dir / source["file"]
    if local.is_file():
        if expected:
            verify(local, expected, "--sha256", on_progress, discard=None)
        report_done(local.name, local.stat().st_size, on_progress)
        return
    listing = repo_listing(source["repo"], cache_dir)
    if source["file"] not in listing.files:
        where = f"the cache at {hub_cache_dir(cache_dir)}" if listing.cached else "the Hub"
        raise PullError(f"{source['file']} of {listing.repo_id} is not in {where}")
    fetch_files(listing, [source["file"]], cache_dir, expected, on_progress)
