"""Pulling from the Hugging Face Hub with huggingface_hub: one GGUF of a repo, or a
Hugging Face-format repo; offline, from the cache; checked against the Hub's sha256."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_obtain.weights.inventory import (
    gguf_quant,
    hub_cache_dir,
    is_gguf_model,
    repo_folder,
    revision_files,
    split_siblings,
)
from vllm_obtain.weights.pull_checks import (
    POLL_S,
    Progress,
    PullError,
    PullProgress,
    report_done,
    verify,
)

# Weights in formats other than safetensors, which vLLM and MLX do not need when a repo has
# safetensors; and folders of other runtimes' copies.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot")


@dataclass(frozen=True)
class RemoteFile:
    size: int | None
    sha256: str | None  # an LFS file's, as the Hub gives it


@dataclass(frozen=True)
class Listing:
    repo_id: str  # as the Hub spells it
    files: dict[str, RemoteFile]
    cached: Path | None  # offline: the cached snapshot the files are in; nothing to fetch


def pull_repo(
    repo: str, quant: str, cache_dir: Path, expected: str | None, on_progress: Progress
) -> str:
    """Fetch one GGUF (with its split parts) or the Hugging Face-format files; the model id."""
    listing = repo_listing(repo, cache_dir)
    by_quant: dict[str, list[str]] = {}
    for name in sorted(listing.files):
        parts = split_siblings(name)
        if is_gguf_model(name) and all(part in listing.files for part in parts):
            by_quant.setdefault(gguf_quant(name).upper(), parts)
    where = "in the cache" if listing.cached else "on the Hub"
    if by_quant:
        choices = ", ".join(f"{listing.repo_id}:{q}" for q in sorted(by_quant))
        if not quant and len(by_quant) > 1:
            raise PullError(
                f"{listing.repo_id} has {len(by_quant)} GGUF files {where}: pick one: {choices}"
            )
        chosen = quant or next(iter(by_quant))
        if chosen not in by_quant:
            raise PullError(f"{listing.repo_id} has no {chosen} GGUF {where}: it has {choices}")
        fetch_files(listing, by_quant[chosen], cache_dir, expected, on_progress)
        return f"{listing.repo_id}:{chosen}"
    if quant:
        raise PullError(f"{listing.repo_id} has no GGUF files {where}: pull {listing.repo_id}")
    if "config.json" not in listing.files:
        raise PullError(
            f"{listing.repo_id} has neither GGUF files nor a config.json {where}: "
            "nothing vllm-obtain can serve"
        )
    if expected:
        raise PullError("--sha256 checks one file; a Hugging Face-format repo has several")
    _fetch_snapshot(listing, _hf_files(listing.files), cache_dir, on_progress)
    return listing.repo_id


def _hf_files(files: dict[str, RemoteFile]) -> list[str]:
    """The repo's top-level files vLLM and MLX read: config, tokenizer, safetensors (the
    pickled copies and other runtimes' folders left out)."""
    top = [name for name in files if "/" not in name]
    if any(name.endswith(".safetensors") for name in top):
        top = [name for name in top if not name.endswith(_OTHER_WEIGHTS)]
    return sorted(top)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_listing(repo: str, cache_dir: Path) -> Listing:
    """The repo's files and their checksums from the Hub; offline (HF_HUB_OFFLINE=1), or when
    the Hub cannot be reached, what the cache holds of it."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    hub = hub_cache_dir(cache_dir)
    if _hub_offline():
        cached = _cached_listing(repo, hub)
        if cached is None:
            raise PullError(
                f"offline (HF_HUB_OFFLINE=1) and {repo} is not in the cache at {hub}: "
                "unset HF_HUB_OFFLINE to download it"
            )
        return cached
    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except RepositoryNotFoundError as exc:
        raise PullError(
            f"{repo} is not on {constants.ENDPOINT} (or it is private or gated: "
            "set HF_TOKEN to a token that may read it)"
        ) from exc
    except HfHubHTTPError as exc:
        raise PullError(f"{repo}: {exc}") from exc
    except _network_errors() as exc:
        cached = _cached_listing(repo, hub)
        if cached is None:
            raise PullError(
                f"cannot reach {constants.ENDPOINT} ({exc}); HF_ENDPOINT sets "
                "another, HF_HUB_OFFLINE=1 uses only the cache"
            ) from exc
        return cached
    files = {
        s.rfilename: RemoteFile(s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    return Listing(info.id, files, None)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached (requests' are
    OSErrors; httpx's, in huggingface_hub 1.x and 2.x, are not)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _cached_listing(repo: str, hub: Path) -> Listing | None:
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(hub)
    except CacheNotFound:
        return None
    for cached in info.repos:
        if cached.repo_type == "model" and cached.repo_id.lower() == repo.lower():
            if not cached.revisions:
                return None
            revision = max(cached.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
            files = {
                name: RemoteFile(f.size_on_disk, None)
                for name, f in revision_files(revision).items()
            }
            return Listing(cached.repo_id, files, Path(revision.snapshot_path))
    return None


def fetch_files(
    listing: Listing,
    names: list[str],
    cache_dir: Path,
    expected: str | None,
    on_progress: Progress,
) -> None:
    """Download these files of the repo into the Hub cache (one at a time: a split GGUF's
    parts), each checked against its sha256."""
    from huggingface_hub import hf_hub_download

    if expected and len(names) > 1:
        raise PullError("--sha256 checks one file; this GGUF is split into several")
    if listing.cached is not None:
        for name in names:
            report_done(name, listing.files[name].size, on_progress)
        return
    hub = hub_cache_dir(cache_dir)
    blobs = hub / repo_folder(listing.repo_id) / "blobs"
    for name in names:
        remote = listing.files[name]
        with _watching(blobs, name, remote.size, on_progress), _hub_errors(listing.repo_id):
            path = Path(
                hf_hub_download(
                    listing.repo_id, name, cache_dir=hub, **_quiet_bars(hf_hub_download)
                )
            )
        if remote.sha256:
            verify(path, remote.sha256, "the Hub's sha256", on_progress, discard=hub)
        if expected:
            verify(path, expected, "--sha256", on_progress, discard=hub)
        report_done(name, remote.size, on_progress)


def _fetch_snapshot(
    listing: Listing, names: list[str], cache_dir: Path, on_progress: Progress
) -> None:
    """Download a Hugging Face-format repo's files (snapshot_download, in parallel), each LFS
    file then checked against its sha256."""
    from huggingface_hub import snapshot_download

    label = listing.repo_id
    total = sum(listing.files[name].size or 0 for name in names)
    if listing.cached is not None:
        report_done(label, total, on_progress)
        return
    hub = hub_cache_dir(cache_dir)
    blobs = hub / repo_folder(listing.repo_id) / "blobs"
    with _watching(blobs, label, total, on_progress), _hub_errors(listing.repo_id):
        folder = Path(
            snapshot_download(
                listing.repo_id,
                cache_dir=hub,
                allow_patterns=names,
                **_quiet_bars(snapshot_download),
            )
        )
    for name in names:
        if sha := listing.files[name].sha256:
            verify(folder / name, sha, "the Hub's sha256", on_progress, discard=hub)
    report_done(label, total, on_progress)


@contextlib.contextmanager
def _hub_errors(repo: str) -> Iterator[None]:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:
        yield
    except GatedRepoError as exc:
        raise PullError(
            f"{repo} is gated: accept its terms on {constants.ENDPOINT}/{repo} and "
            "set HF_TOKEN to a token of that account"
        ) from exc
    except HfHubHTTPError as exc:
        raise PullError(f"{repo}: {exc}") from exc
    except _network_errors() as exc:
        raise PullError(
            f"{repo}: the download failed ({exc}); run pull again to resume it"
        ) from exc


def _quiet_bars(function: Callable[..., Any]) -> dict[str, Any]:
    """Keep huggingface_hub's own progress bars off the terminal (we report progress
    ourselves), where the installed version lets us."""
    if "tqdm_class" not in inspect.signature(function).parameters:
        return {}
    from tqdm import tqdm

    class SilentBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})

        # One bar, not two, for a Xet download (huggingface_hub >= 1.x looks for these).
        def update_transfer(self, n: int = 1) -> None:
            pass

        def set_transfer_postfix_str(self, text: str = "", refresh: bool = True) -> None:
            pass

    return {"tqdm_class": SilentBar}


@contextlib.contextmanager
def _watching(blobs: Path, label: str, total: int | None, on_progress: Progress) -> Iterator[None]:
    """Report a Hub download's progress from the bytes its blobs folder gains, read in a thread
    (huggingface_hub writes `<blob>.incomplete`, then renames it): the same on every version
    of huggingface_hub, whichever transfer it uses."""
    start = _folder_bytes(blobs)
    resumed = _folder_bytes(blobs, suffix=".incomplete")
    stop = threading.Event()

    def completed() -> int:
        done = resumed + max(0, _folder_bytes(blobs) - start)
        return done if total is None else min(done, total)

    def poll() -> None:
        while not stop.wait(POLL_S):
            on_progress(PullProgress("downloading", label, completed(), total))

    on_progress(PullProgress("downloading", label, resumed, total))
    watcher = threading.Thread(target=poll, name="pull-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    on_progress(PullProgress("downloading", label, completed() if total is None else total, total))


def _folder_bytes(folder: Path, suffix: str = "") -> int:
    total = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
        except OSError:  # renamed or deleted while we looked
            continue
    return total
