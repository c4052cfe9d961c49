"""The commands that manage models on disk and ask a server what it holds: pull, list, rm,
ps."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm_obtain.cli_flags import settings_from
from vllm_obtain.settings import Settings

if TYPE_CHECKING:
    from vllm_obtain.weights.pull import PullProgress


def human_bytes(size: int | None) -> str:
    """1234567890 -> '1.2 GB'; decimal units, as model pages and download tools give them."""
    if size is None:
        return "-"
    if size >= 10**9:
        return f"{size / 10**9:.1f} GB"
    return f"{size / 10**6:.0f} MB" if size >= 10**6 else f"{size / 10**3:.0f} KB"


class PullBars:
    """A tqdm bar (speed, time left) per file and stage of a pull, on stderr."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._key: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def show(self, progress: PullProgress) -> None:
        from tqdm import tqdm

        with self._lock:
            if progress.status == "resolving":
                print(f"pulling {progress.file}", file=sys.stderr)
                return
            key = (progress.status, progress.file)
            if progress.status == "done":
                self.close()
                return
            if key != self._key:
                self.close()
                self._key = key
                self._bar = tqdm(
                    desc=f"{progress.status} {progress.file}",
                    total=progress.total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=sys.stderr,
                )
            if progress.total is not None and self._bar.total != progress.total:
                self._bar.total = progress.total
            self._bar.update(progress.completed - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


def pull_command(args: argparse.Namespace) -> int:
    """Download a model (resumable, verified), with progress; print the id clients send."""
    from vllm_obtain.weights.pull import PullError, PullPolicy, pull

    settings = settings_from(args)
    policy = PullPolicy(
        allow_http=settings.pull_allow_http,
        allow_hosts=frozenset(settings.pull_allow_hosts),
        max_bytes=settings.pull_max_bytes,
    )
    bars = PullBars()
    try:
        model = pull(
            args.name,
            models_dir=settings.models_dir,
            cache_dir=settings.cache_dir,
            sha256=args.sha256,
            on_progress=bars.show,
            policy=policy,
        )
    except PullError as exc:
        print(f"vllm-obtain: {exc}", file=sys.stderr)
        return 2
    finally:
        bars.close()
    print(
        f"{model.id}: {model.format}, {human_bytes(model.size_bytes)}, {model.path}",
        file=sys.stderr,
    )
    print(model.id)
    return 0


def list_installed(args: argparse.Namespace) -> int:
    """The installed models, with the engine that would serve each here."""
    from vllm_obtain.contract import EngineNotInstalledError
    from vllm_obtain.hardware import choose_engine, detect_platform
    from vllm_obtain.weights.inventory import installed_models

    settings = settings_from(args)
    models = installed_models(settings.models_dir, settings.cache_dir)
    if not models:
        print("no models installed: vllm-obtain pull NAME fetches one")
        return 0
    info = detect_platform()
    rows = [("ID", "FORMAT", "SIZE", "ENGINE", "SOURCE")]
    for model in models:
        try:
            engine, _ = choose_engine(info, model.format, settings.engine)
        except EngineNotInstalledError:
            engine = "none installed"
        rows.append((model.id, model.format, human_bytes(model.size_bytes), engine, model.source))
    print_table(rows)
    return 0


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def remove_model(args: argparse.Namespace) -> int:
    """Delete an installed model from models/ or the Hugging Face cache."""
    from vllm_obtain.weights.inventory import InventoryError, find_installed, remove_installed

    settings = settings_from(args)
    model = find_installed(args.name, settings.models_dir, settings.cache_dir)
    if model is None:
        print(
            f"vllm-obtain: '{args.name}' is not installed (vllm-obtain list shows what is)",
            file=sys.stderr,
        )
        return 2
    try:
        removed = remove_installed(model, settings.models_dir, settings.cache_dir)
    except InventoryError as exc:
        print(f"vllm-obtain: {exc}", file=sys.stderr)
        return 2
    for path in removed:
        print(f"removed {path}", file=sys.stderr)
    print(f"removed {model.id} ({human_bytes(model.size_bytes)})")
    return 0


def show_running(args: argparse.Namespace) -> int:
    """The models a running server holds (loading, loaded...), from its /admin/models."""
    settings = Settings()
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    base = (args.base_url or f"http://{host}:{settings.port}").rstrip("/")
    api_key = args.api_key or next(iter([*settings.admin_keys, *settings.api_keys]), None)
    try:
        listing = fetch_json(f"{base}/admin/models", api_key)
    except urllib.error.HTTPError as exc:
        hint = {
            401: ": give its admin key with --api-key",
            403: ": it needs an admin key (--api-key), or run this on the server's machine",
            404: ": is it a vllm-obtain server?",
        }
        print(
            f"vllm-obtain: {base}/admin/models: HTTP {exc.code}{hint.get(exc.code, '')}",
            file=sys.stderr,
        )
        return 2
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"vllm-obtain: cannot reach {base}: {exc}", file=sys.stderr)
        return 2
    running = [m for m in listing.get("data", []) if m.get("state") != "available"]
    if not running:
        print("no models loaded")
        return 0
    rows = [("ID", "STATE", "ENGINE", "MEMORY", "UNTIL")]
    now = time.time()
    for model in running:
        rows.append(
            (
                str(model.get("id")),
                str(model.get("state")),
                str(model.get("engine") or "-"),
                human_bytes(model.get("memory_bytes")),
                until(model.get("expires_at"), now),
            )
        )
    print_table(rows)
    return 0


def fetch_json(url: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def until(expires_at: float | None, now: float) -> str:
    """When a loaded model is unloaded: 'never', 'in 4 minutes', 'now'."""
    if expires_at is None:
        return "never"
    left = expires_at - now
    if left < 1:
        return "now"
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= seconds:
            count = round(left / seconds)
            return f"in {count} {unit}{'s' if count != 1 else ''}"
    return "now"
