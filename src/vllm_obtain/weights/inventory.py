"""What is installed and servable here, found on disk and never on the network: catalogue
aliases whose weights are local, GGUF files and Hugging Face folders in models/, and what
`pull` fetched into the Hugging Face cache (cache/huggingface, the hub's own layout)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from vllm_obtain.weights.catalog import (
    ModelResolutionError,
    load_catalog,
    local_model_id,
    packaged_file,
)

if TYPE_CHECKING:
    from huggingface_hub import CachedFileInfo, CachedRevisionInfo

# The catalogue's engine keys, in the order an alias's local weights are preferred.
CATALOG_ENGINES = ("llama.cpp", "vllm", "mlx")
PARTIAL_SUFFIXES = (".part", ".incomplete")
# A GGUF's quantisation at the end of its stem: model-q4_k_m, Model.Q8_0, model-IQ4_XS, -BF16.
_QUANT = re.compile(r"(?:^|[-._])(I?Q\d[A-Z0-9_]*|BF16|F16|F32)$")
# llama.cpp's split files: model-Q4_K_M-00001-of-00003.gguf (llama.cpp loads the first part).
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})$", re.IGNORECASE)


@dataclass(frozen=True)
class InstalledModel:
    id: str  # what clients send as `model`
    # A .gguf file or a Hugging Face-format directory; for an alias, the local file (or folder)
    # that makes it available.
    path: Path
    # "alias": a catalogue alias; wiring resolves it per engine with catalog.resolve_model.
    format: Literal["gguf", "hf", "alias"]
    size_bytes: int  # on disk, symlinks followed to their blobs
    source: Literal["alias", "models", "hub"]


class InventoryError(RuntimeError):
    """A model that cannot be removed; the message says why and what would."""


@dataclass(frozen=True)
class _Entry:
    model: InstalledModel
    names: frozenset[str]  # lower-case names that find it: its id, files and repos it came from


def hub_cache_dir(cache_dir: Path) -> Path:
    """Where the Hugging Face cache lives under our cache dir (its own layout)."""
    return cache_dir / "huggingface"


def gguf_quant(filename: str) -> str:
    """The quantisation a GGUF file name ends with, upper-case: qwen2.5-0.5b-instruct-q4_k_m.gguf
    -> Q4_K_M, SmolLM2-135M-Instruct.Q8_0.gguf -> Q8_0; the stem when it names none."""
    stem = _SPLIT.sub("", PurePosixPath(filename).name.removesuffix(".gguf").removesuffix(".GGUF"))
    match = _QUANT.search(stem.upper())
    return match.group(1) if match else stem


def split_part(filename: str) -> tuple[int, int] | None:
    """(part, parts) of a split GGUF (model-Q4_K_M-00002-of-00003.gguf -> (2, 3)), else None."""
    match = _SPLIT.search(PurePosixPath(filename).stem)
    return (int(match.group(1)), int(match.group(2))) if match else None


def split_siblings(filename: str) -> list[str]:
    """Every part of the split GGUF `filename` (itself when it is not split), in order."""
    path = PurePosixPath(filename)
    match = _SPLIT.search(path.stem)
    if match is None:
        return [filename]
    prefix, parts = path.stem[: match.start()], int(match.group(2))
    names = [f"{prefix}-{i:05d}-of-{parts:05d}{path.suffix}" for i in range(1, parts + 1)]
    return [(path.parent / name).as_posix() for name in names]


def is_gguf_model(filename: str) -> bool:
    """A GGUF file that is a model by itself (not a vision projector, not a later split part)."""
    name = PurePosixPath(filename).name.lower()
    part = split_part(filename)
    return (
        name.endswith(".gguf") and not name.startswith("mmproj") and (part is None or part[0] == 1)
    )


def repo_folder(repo_id: str) -> str:
    """The folder of a model repo in the Hugging Face cache (models--org--name)."""
    return "models--" + repo_id.replace("/", "--")


def installed_models(models_dir: Path, cache_dir: Path) -> list[InstalledModel]:
    """What can be served here without a download: aliases first, then models/, then the Hub
    cache; a file that an alias uses is listed once, as the alias."""
    return [entry.model for entry in _entries(models_dir, cache_dir)]


def find_installed(name: str, models_dir: Path, cache_dir: Path) -> InstalledModel | None:
    """The installed model `name` refers to: its id (any case), an alias, a name `pull` took
    (org/name:QUANT, org/name when it has one quantisation here, a URL), or a path."""
    entries = _entries(models_dir, cache_dir)
    key = name.strip().lower()
    if "://" in key:  # a URL pull saved its file under its own name
        key = unquote(PurePosixPath(urlsplit(key).path).name)
    for entry in entries:
        if key in entry.names:
            return entry.model
    prefix = key + ":"
    candidates = [e for e in entries if any(n.startswith(prefix) for n in e.names)]
    if len(candidates) == 1:
        return candidates[0].model
    return _by_path(name, entries)


def _by_path(name: str, entries: list[_Entry]) -> InstalledModel | None:
    path = Path(name).expanduser()
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if not is_gguf and not (path / "config.json").is_file():
        return None
    resolved = path.resolve()
    for entry in entries:
        if entry.model.path.resolve() == resolved:
            return entry.model
    model_id = local_model_id(resolved)
    kind: Literal["gguf", "hf"] = "gguf" if is_gguf else "hf"
    return InstalledModel(model_id, resolved, kind, size_on_disk(resolved), "models")


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of a folder's files (each once), symlinks followed to their blobs."""
    if path.is_file():
        return path.stat().st_size
    seen: dict[Path, int] = {}
    for file in path.rglob("*"):
        if file.is_file():
            seen.setdefault(file.resolve(), file.stat().st_size)
    return sum(seen.values())


def _entries(models_dir: Path, cache_dir: Path) -> list[_Entry]:
    revisions = _hub_revisions(hub_cache_dir(cache_dir))
    entries: list[_Entry] = []
    owned: set[str] = set()  # lower-case names of files and repos an installed alias stands for
    for alias, spec in load_catalog()["models"].items():
        entry = _alias_entry(alias, spec, models_dir, cache_dir, revisions)
        if entry is not None:
            entries.append(entry)
            owned |= entry.names
    found = [*_models_dir_entries(models_dir), *_hub_entries(revisions)]
    taken = {e.model.id.lower() for e in entries}
    for entry in found:
        if entry.names & owned or entry.model.id.lower() in taken:
            continue
        entries.append(entry)
        taken.add(entry.model.id.lower())
    return entries


def alias_local_sources(
    spec: dict[str, Any], models_dir: Path, cache_dir: Path
) -> list[tuple[dict[str, Any], Path]]:
    """(source, local path) for each engine source of a catalogue entry already on disk."""
    revisions = _hub_revisions(hub_cache_dir(cache_dir))
    return _local_sources(spec, models_dir, cache_dir, revisions)


def _local_sources(
    spec: dict[str, Any], models_dir: Path, cache_dir: Path, revisions: dict[str, Any]
) -> list[tuple[dict[str, Any], Path]]:
    found: list[tuple[dict[str, Any], Path]] = []
    for engine in CATALOG_ENGINES:
        source = spec.get(engine) or {}
        local = _local_source(source, models_dir, cache_dir, revisions)
        if local is not None and all(local != path for _, path in found):
            found.append((source, local))
    return found


def _alias_entry(
    alias: str, spec: dict[str, Any], models_dir: Path, cache_dir: Path, revisions: dict[str, Any]
) -> _Entry | None:
    sources = _local_sources(spec, models_dir, cache_dir, revisions)
    if not sources:
        return None
    names = {alias.lower()}
    for source, _ in sources:
        names |= _source_names(source)
    path = sources[0][1]
    model = InstalledModel(alias, path, "alias", size_on_disk(path), "alias")
    return _Entry(model, frozenset(names))


def _local_source(
    source: dict[str, Any], models_dir: Path, cache_dir: Path, revisions: dict[str, Any]
) -> Path | None:
    """Where a catalogue source's weights already are, as catalog.resolve_model looks."""
    if "package" in source:
        try:
            return packaged_file(source["package"], source["file"])
        except ModelResolutionError:
            return None
    if "file" in source:
        local = models_dir / source["file"]
        if local.is_file():
            return local
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            source["repo"], source["file"], cache_dir=hub_cache_dir(cache_dir)
        )
        return Path(cached) if isinstance(cached, str) else None
    if "repo" in source:
        local = models_dir / source["repo"].split("/")[-1]
        if (local / "config.json").is_file():
            return local
        revision = revisions.get(source["repo"].lower())
        if revision is not None and is_complete_hf_folder(revision.snapshot_path):
            return Path(revision.snapshot_path)
    return None


def _source_names(source: dict[str, Any]) -> set[str]:
    """The names (lower-case) under which models/ or the Hub cache would list this source."""
    if "package" in source:
        return set()
    repo = source["repo"]
    if "file" in source:
        file = source["file"]
        name = PurePosixPath(file)
        return {f"{repo}:{gguf_quant(file)}".lower(), name.name.lower(), name.stem.lower()}
    return {repo.lower(), repo.split("/")[-1].lower()}


def _models_dir_entries(models_dir: Path) -> list[_Entry]:
    if not models_dir.is_dir():
        return []
    entries = []
    for path in sorted(models_dir.iterdir()):
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES):
            continue  # a download in progress (.partial/, .part) is not servable yet
        if path.is_file() and path.suffix.lower() == ".gguf":
            model = InstalledModel(local_model_id(path), path, "gguf", size_on_disk(path), "models")
            names = {path.stem.lower(), path.name.lower()}
        elif (path / "config.json").is_file():
            model = InstalledModel(local_model_id(path), path, "hf", size_on_disk(path), "models")
            names = {path.name.lower()}
        else:
            continue
        entries.append(_Entry(model, frozenset(names)))
    return entries


def _hub_revisions(hub: Path) -> dict[str, CachedRevisionInfo]:
    """Model repo id (lower-case) -> its newest cached revision (the one `main` points at)."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(hub)
    except CacheNotFound:
        return {}
    newest = {}
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest[repo.repo_id.lower()] = max(
            repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified)
        )
    return newest


def revision_files(revision: CachedRevisionInfo) -> dict[str, CachedFileInfo]:
    """A cached revision's files by their path in the repo (sub/folder/file.gguf)."""
    root = Path(revision.snapshot_path)
    return {Path(f.file_path).relative_to(root).as_posix(): f for f in revision.files}


def _hub_entries(revisions: dict[str, CachedRevisionInfo]) -> list[_Entry]:
    entries = []
    for revision in revisions.values():
        repo_id = _repo_id_of(revision)
        files = revision_files(revision)
        ids: set[str] = set()
        for name in sorted(files):
            if not is_gguf_model(name):
                continue
            parts = split_siblings(name)
            if not all(part in files for part in parts):
                continue  # a split model some of whose parts are missing
            model_id = f"{repo_id}:{gguf_quant(name)}"
            if model_id.lower() in ids:
                model_id = f"{repo_id}:{PurePosixPath(name).stem}"
            ids.add(model_id.lower())
            size = sum(files[part].size_on_disk for part in parts)
            path = Path(files[name].file_path)
            model = InstalledModel(model_id, path, "gguf", size, "hub")
            names = frozenset({model_id.lower(), f"{repo_id}:{name}".lower()})
            entries.append(_Entry(model, names))
        snapshot = Path(revision.snapshot_path)
        if is_complete_hf_folder(snapshot):
            size = sum(f.size_on_disk for name, f in files.items() if not name.endswith(".gguf"))
            model = InstalledModel(repo_id, snapshot, "hf", size, "hub")
            entries.append(_Entry(model, frozenset({repo_id.lower()})))
    return sorted(entries, key=lambda e: e.model.id.lower())


def _repo_id_of(revision: CachedRevisionInfo) -> str:
    """org/name, as the cache folder spells it (models--org--name/snapshots/<commit>)."""
    folder = Path(revision.snapshot_path).parents[1].name
    return folder.removeprefix("models--").replace("--", "/")


def is_complete_hf_folder(folder: Path) -> bool:
    """A Hugging Face-format folder with its config and every weight shard its index names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    indexes = sorted(folder.glob("*.index.json"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        if all((folder / shard).is_file() for shard in shards):
            return True
    if indexes:
        return False
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def remove_installed(model: InstalledModel, models_dir: Path, cache_dir: Path) -> list[Path]:
    """Delete an installed model's files (for an alias: every local copy of its weights) from
    models/ or the Hub cache; the paths removed."""
    if model.source == "alias":
        spec = load_catalog()["models"][model.id]
        sources = alias_local_sources(spec, models_dir, cache_dir)
        if packaged := [s for s, _ in sources if "package" in s]:
            package = packaged[0]["package"]
            raise InventoryError(
                f"'{model.id}' is embedded: it ships in the pip package "
                f"{package.replace('_', '-')} and cannot be removed (it is the default model)"
            )
        paths = [path for _, path in sources]
    else:
        paths = [model.path]
    for path in paths:
        _remove_path(path, models_dir, hub_cache_dir(cache_dir))
    return paths


def _is_inside(path: Path, folder: Path) -> bool:
    # abspath, not resolve: a symlink in models/ (or a hub snapshot entry) is what we delete.
    path_text, folder_text = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path_text, folder_text]) == folder_text and path_text != folder_text


def _remove_path(path: Path, models_dir: Path, hub: Path) -> None:
    if _is_inside(path, hub):
        remove_hub_files(path, hub)
    elif _is_inside(path, models_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    else:
        raise InventoryError(f"{path} is outside {models_dir}/ and the cache: delete it yourself")


def remove_hub_files(path: Path, hub: Path) -> None:
    """Delete a cached model: a snapshot folder (its Hugging Face-format files) or a GGUF file
    (all its split parts), with their blobs; the whole revision when nothing else is left."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub)
    target = Path(os.path.abspath(path))
    for repo in info.repos:
        for revision in repo.revisions:
            snapshot = Path(os.path.abspath(revision.snapshot_path))
            if target != snapshot and snapshot not in target.parents:
                continue
            files = revision_files(revision)
            if target == snapshot:
                chosen = [f for name, f in files.items() if not name.endswith(".gguf")]
            else:
                names = split_siblings(target.relative_to(snapshot).as_posix())
                chosen = [files[name] for name in names if name in files]
            if len(chosen) == len(files):
                info.delete_revisions(revision.commit_hash).execute()
            else:
                _delete_cached_files(info, chosen)
            return
    raise InventoryError(f"{path} is not in the Hugging Face cache at {hub}")


def _delete_cached_files(info: Any, files: Iterable[CachedFileInfo]) -> None:
    files = list(files)
    if hasattr(info, "delete_files"):  # huggingface_hub >= 1.x: also sweeps a shared blob store
        info.delete_files(*files).execute()
        return
    kept = {
        f.blob_path
        for repo in info.repos
        for revision in repo.revisions
        for f in revision.files
        if f not in files
    }
    for file in files:
        Path(file.file_path).unlink(missing_ok=True)
        if file.blob_path not in kept:
            Path(file.blob_path).unlink(missing_ok=True)
