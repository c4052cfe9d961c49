"""Fetching a model onto this machine: a catalogue alias, a Hugging Face repo (org/name, or
org/name:QUANT for one GGUF of it) or the URL of a .gguf file; with progress, resumed after a
dropped connection, checked against its sha256, and never half-visible to the server."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import inspect
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import Request, urlopen

from vllm_obtain import __version__
from vllm_obtain.weights.catalog import ModelResolutionError, load_catalog, packaged_file
from vllm_obtain.weights.inventory import (
    InstalledModel,
    find_installed,
    gguf_quant,
    hub_cache_dir,
    is_gguf_model,
    remove_hub_files,
    repo_folder,
    revision_files,
    split_siblings,
)

CHUNK_BYTES = 1 << 20
URL_TIMEOUT_S = 30.0
URL_RETRIES = 5  # dropped connections in a row (with no new bytes) before giving up
RETRY_DELAY_S = 0.5  # doubled after each failure in a row
POLL_S = 0.25  # how often a Hub download's progress is read off its .incomplete blob
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Weights in formats other than safetensors, which vLLM and MLX do not need when a repo has
# safetensors; and folders of other runtimes' copies.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot")


@dataclass(frozen=True)
class PullProgress:
    status: Literal["resolving", "downloading", "verifying", "done"]
    file: str
    completed: int  # bytes
    total: int | None  # bytes, when known


class PullError(RuntimeError):
    """A pull that failed; the message says what went wrong and what to do."""


Progress = Callable[[PullProgress], None]


def pull(
    name: str,
    *,
    models_dir: Path,
    cache_dir: Path,
    sha256: str | None = None,
    on_progress: Progress = lambda p: None,
) -> InstalledModel:
    """Fetch `name` (an alias, org/name[:QUANT], or an http(s) URL of a .gguf file) unless it is
    here already; blocking. `on_progress` may be called from a helper thread."""
    name = name.strip()
    expected = _digest(sha256, "--sha256") if sha256 else None
    on_progress(PullProgress("resolving", name, 0, None))
    if name.startswith(("https://", "http://")):
        path = _pull_url(name, models_dir, expected, on_progress)
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
    model_id = _pull_repo(repo, quant.upper(), cache_dir, expected, on_progress)
    return _installed(model_id, models_dir, cache_dir)


def _installed(name: str, models_dir: Path, cache_dir: Path) -> InstalledModel:
    model = find_installed(name, models_dir, cache_dir)
    if model is None:  # the inventory and pull disagree about where files go
        raise PullError(f"'{name}' was fetched but is not found among the installed models")
    return model


def _digest(text: str, where: str) -> str:
    digest = text.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(digest):
        raise PullError(f"{where} wants a sha256 of 64 hex digits, not '{text}'")
    return digest


# --- a catalogue alias -----------------------------------------------------------------------


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
        _done(path.name, path.stat().st_size, on_progress)
        return
    if "file" not in source:
        raise PullError(f"'{alias}' has no GGUF file in the catalogue to pull")
    local = models_dir / source["file"]
    if local.is_file():
        if expected:
            _verify(local, expected, "--sha256", on_progress, discard=None)
        _done(local.name, local.stat().st_size, on_progress)
        return
    listing = _listing(source["repo"], cache_dir)
    if source["file"] not in listing.files:
        where = f"the cache at {hub_cache_dir(cache_dir)}" if listing.cached else "the Hub"
        raise PullError(f"{source['file']} of {listing.repo_id} is not in {where}")
    _fetch_files(listing, [source["file"]], cache_dir, expected, on_progress)


# --- a Hugging Face repo ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RemoteFile:
    size: int | None
    sha256: str | None  # an LFS file's, as the Hub gives it


@dataclass(frozen=True)
class _Listing:
    repo_id: str  # as the Hub spells it
    files: dict[str, _RemoteFile]
    cached: Path | None  # offline: the cached snapshot the files are in; nothing to fetch


def _pull_repo(
    repo: str, quant: str, cache_dir: Path, expected: str | None, on_progress: Progress
) -> str:
    """Fetch one GGUF (with its split parts) or the Hugging Face-format files; the model id."""
    listing = _listing(repo, cache_dir)
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
        _fetch_files(listing, by_quant[chosen], cache_dir, expected, on_progress)
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


def _hf_files(files: dict[str, _RemoteFile]) -> list[str]:
    """The repo's top-level files vLLM and MLX read: config, tokenizer, safetensors (the
    pickled copies and other runtimes' folders left out)."""
    top = [name for name in files if "/" not in name]
    if any(name.endswith(".safetensors") for name in top):
        top = [name for name in top if not name.endswith(_OTHER_WEIGHTS)]
    return sorted(top)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _listing(repo: str, cache_dir: Path) -> _Listing:
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
        s.rfilename: _RemoteFile(s.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    return _Listing(info.id, files, None)


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


def _cached_listing(repo: str, hub: Path) -> _Listing | None:
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
                name: _RemoteFile(f.size_on_disk, None)
                for name, f in revision_files(revision).items()
            }
            return _Listing(cached.repo_id, files, Path(revision.snapshot_path))
    return None


def _fetch_files(
    listing: _Listing,
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
            _done(name, listing.files[name].size, on_progress)
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
            _verify(path, remote.sha256, "the Hub's sha256", on_progress, discard=hub)
        if expected:
            _verify(path, expected, "--sha256", on_progress, discard=hub)
        _done(name, remote.size, on_progress)


def _fetch_snapshot(
    listing: _Listing, names: list[str], cache_dir: Path, on_progress: Progress
) -> None:
    """Download a Hugging Face-format repo's files (snapshot_download, in parallel), each LFS
    file then checked against its sha256."""
    from huggingface_hub import snapshot_download

    label = listing.repo_id
    total = sum(listing.files[name].size or 0 for name in names)
    if listing.cached is not None:
        _done(label, total, on_progress)
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
            _verify(folder / name, sha, "the Hub's sha256", on_progress, discard=hub)
    _done(label, total, on_progress)


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


# --- a URL ------------------------------------------------------------------------------------

_URL_LOCKS: dict[Path, threading.Lock] = {}
_URL_LOCKS_GUARD = threading.Lock()


def _pull_url(url: str, models_dir: Path, expected: str | None, on_progress: Progress) -> Path:
    """Download a .gguf URL to models/<file>, through models/.partial/<file>.part (continued
    with a Range request when a pull was interrupted) and renamed in only when whole and
    verified."""
    parts = urlsplit(url)
    address = urlunsplit(parts._replace(fragment=""))
    if parts.fragment:  # `#sha256=HEX`, as pip reads it
        key, _, value = parts.fragment.partition("=")
        if key != "sha256":
            raise PullError(f"a URL's fragment may only be #sha256=HEX, not #{parts.fragment}")
        fragment = _digest(value, "the URL's #sha256")
        if expected and expected != fragment:
            raise PullError(f"--sha256 {expected} and the URL's #sha256={fragment} differ")
        expected = fragment
    filename = unquote(PurePosixPath(parts.path).name)
    if not filename.lower().endswith(".gguf") or "/" in filename or filename.startswith("."):
        raise PullError(f"{address} does not name a .gguf file: pull takes GGUF URLs only")
    target = models_dir / filename
    with _url_lock(target):
        if target.is_file():  # pulled before: check it, fetch nothing
            if expected:
                _verify(target, expected, "--sha256", on_progress, discard=None)
            _done(filename, target.stat().st_size, on_progress)
            return target
        partial = models_dir / ".partial" / f"{filename}.part"
        partial.parent.mkdir(parents=True, exist_ok=True)
        _download(address, partial, filename, on_progress)
        if expected:
            _verify(
                partial,
                expected,
                "the expected sha256",
                on_progress,
                discard=partial,
                label=filename,
            )
        os.replace(partial, target)  # atomic: the server sees no file, or the whole file
        _remove_if_empty(partial.parent)
    _done(filename, target.stat().st_size, on_progress)
    return target


@contextlib.contextmanager
def _url_lock(target: Path) -> Iterator[None]:
    """One download per file at a time in this process (the server may pull from threads)."""
    with _URL_LOCKS_GUARD:
        lock = _URL_LOCKS.setdefault(target.resolve(), threading.Lock())
    with lock:
        yield


def _download(address: str, partial: Path, label: str, on_progress: Progress) -> None:
    """Fill `partial` with the body of `address`, resuming after a dropped connection."""
    failures = 0
    while True:
        before = partial.stat().st_size if partial.exists() else 0
        try:
            if _download_once(address, partial, label, on_progress):
                return
            problem = "the connection closed before the end of the file"
        except HTTPError as exc:
            if exc.code == 416 and before and _whole(exc, before):
                return  # the .part already holds the whole file
            if exc.code == 416:
                partial.unlink(missing_ok=True)  # the file changed under us: start again
                problem = "the server refused to resume"
            else:
                raise PullError(f"{address}: HTTP {exc.code} {exc.reason}") from exc
        except (URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            problem = str(getattr(exc, "reason", None) or exc or type(exc).__name__)
        got = partial.stat().st_size if partial.exists() else 0
        failures = 1 if got > before else failures + 1  # progress resets the count
        if failures > URL_RETRIES:
            _remove_if_empty(partial.parent)
            raise PullError(
                f"{address}: {problem} ({URL_RETRIES} retries); run pull again to "
                f"resume from byte {got}"
            )
        time.sleep(RETRY_DELAY_S * 2 ** (failures - 1))


def _download_once(address: str, partial: Path, label: str, on_progress: Progress) -> bool:
    """One request, appended to what `partial` holds; whether the body came whole."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": f"vllm-obtain/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urlopen(Request(address, headers=headers), timeout=URL_TIMEOUT_S) as response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise PullError(f"{address}: asked for bytes from {offset}, sent from {start}")
        else:
            offset = 0  # a 200: the server ignored the Range, the body is the whole file
        length_text = response.headers.get("Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        total = offset + length if length is not None else None
        received = 0
        with partial.open("ab" if offset else "wb") as out:
            on_progress(PullProgress("downloading", label, offset, total))
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                on_progress(PullProgress("downloading", label, offset + received, total))
    # http.client returns a short body, not an error, when a Content-Length body is cut off.
    return length is None or received >= length


def _range_start(content_range: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _whole(error: HTTPError, size: int) -> bool:
    """A 416 whose Content-Range (bytes */N) says the file is `size` bytes long."""
    match = re.match(r"bytes \*/(\d+)", error.headers.get("Content-Range") or "")
    return match is not None and int(match.group(1)) == size


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another pull's .part), or gone
        folder.rmdir()


# --- checks -----------------------------------------------------------------------------------


def _verify(
    path: Path,
    expected: str,
    what: str,
    on_progress: Progress,
    *,
    discard: Path | None,
    label: str | None = None,
) -> None:
    """Compare the file's sha256 with `expected`; on a mismatch delete it (`discard`: the .part
    itself, or the Hub cache it is in) and fail."""
    expected = expected.lower()
    label = label or path.name
    actual = _sha256(path, label, on_progress)
    if actual == expected:
        return
    if discard is not None and discard == path:
        path.unlink(missing_ok=True)
        _remove_if_empty(path.parent)
        fate = "it was deleted; pull again (or check the sha256 you gave)"
    elif discard is not None:
        remove_hub_files(path, discard)
        fate = "it was deleted from the cache; pull again"
    else:
        fate = f"{path} is left as it was: vllm-obtain rm it, then pull again"
    raise PullError(f"{label}: its sha256 is {actual}, not {expected} ({what}): {fate}")


def _sha256(path: Path, label: str, on_progress: Progress) -> str:
    total = path.stat().st_size
    digest, done, reported = hashlib.sha256(), 0, 0.0
    with path.open("rb") as source:
        while block := source.read(CHUNK_BYTES * 8):
            digest.update(block)
            done += len(block)
            if (now := time.monotonic()) - reported > POLL_S or done == total:
                on_progress(PullProgress("verifying", label, done, total))
                reported = now
    return digest.hexdigest()


def _done(label: str, size: int | None, on_progress: Progress) -> None:
    on_progress(PullProgress("done", label, size or 0, size))
