"""Pulling a .gguf file by URL: only what the pull policy lets it reach and write
(pull_guard.py), resumed with Range requests after a dropped connection, checked, and renamed
into models/ only when whole."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import Request

from vllm_obtain import __version__
from vllm_obtain.weights.pull_checks import (
    CHUNK_BYTES,
    Progress,
    PullError,
    PullProgress,
    remove_if_empty,
    report_done,
    sha256_digest,
    verify,
)
from vllm_obtain.weights.pull_guard import (
    PullPolicy,
    PullTooLarge,
    SizeCap,
    check_url,
    open_checked,
)

URL_TIMEOUT_S = 30.0
URL_RETRIES = 5  # dropped connections in a row (with no new bytes) before giving up
RETRY_DELAY_S = 0.5  # doubled after each failure in a row
_URL_LOCKS: dict[Path, threading.Lock] = {}
_URL_LOCKS_GUARD = threading.Lock()


def pull_url(
    url: str,
    models_dir: Path,
    expected: str | None,
    on_progress: Progress,
    policy: PullPolicy,
) -> Path:
    """Download a .gguf URL to models/<file>, through models/.partial/<file>.part (continued
    with a Range request when a pull was interrupted) and renamed in only when whole and
    verified; refused when `policy` forbids the URL, an address it reaches, or its size."""
    check_url(url, policy)
    parts = urlsplit(url)
    address = urlunsplit(parts._replace(fragment=""))
    if parts.fragment:  # `#sha256=HEX`, as pip reads it
        key, _, value = parts.fragment.partition("=")
        if key != "sha256":
            raise PullError(f"a URL's fragment may only be #sha256=HEX, not #{parts.fragment}")
        fragment = sha256_digest(value, "the URL's #sha256")
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
                verify(target, expected, "--sha256", on_progress, discard=None)
            report_done(filename, target.stat().st_size, on_progress)
            return target
        partial = models_dir / ".partial" / f"{filename}.part"
        partial.parent.mkdir(parents=True, exist_ok=True)
        held = partial.stat().st_size if partial.exists() else 0
        cap = SizeCap.for_pull(policy, models_dir, held)
        _download(address, partial, filename, on_progress, policy, cap)
        if expected:
            verify(
                partial,
                expected,
                "the expected sha256",
                on_progress,
                discard=partial,
                label=filename,
            )
        os.replace(partial, target)  # atomic: the server sees no file, or the whole file
        remove_if_empty(partial.parent)
    report_done(filename, target.stat().st_size, on_progress)
    return target


@contextlib.contextmanager
def _url_lock(target: Path) -> Iterator[None]:
    """One download per file at a time in this process (the server may pull from threads)."""
    with _URL_LOCKS_GUARD:
        lock = _URL_LOCKS.setdefault(target.resolve(), threading.Lock())
    with lock:
        yield


def _download(
    address: str,
    partial: Path,
    label: str,
    on_progress: Progress,
    policy: PullPolicy,
    cap: SizeCap,
) -> None:
    """Fill `partial` with the body of `address`, resuming after a dropped connection."""
    failures = 0
    while True:
        before = partial.stat().st_size if partial.exists() else 0
        try:
            if _download_once(address, partial, label, on_progress, policy, cap):
                return
            problem = "the connection closed before the end of the file"
        except PullTooLarge:
            partial.unlink(missing_ok=True)  # closed by now, as Windows needs to delete it
            remove_if_empty(partial.parent)
            raise
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
            remove_if_empty(partial.parent)
            raise PullError(
                f"{address}: {problem} ({URL_RETRIES} retries); run pull again to "
                f"resume from byte {got}"
            )
        time.sleep(RETRY_DELAY_S * 2 ** (failures - 1))


def _download_once(
    address: str,
    partial: Path,
    label: str,
    on_progress: Progress,
    policy: PullPolicy,
    cap: SizeCap,
) -> bool:
    """One request, appended to what `partial` holds; whether the body came whole. Over the
    size cap (announced, or as bytes arrive: a chunked body announces nothing) it fails."""
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": f"vllm-obtain/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with open_checked(Request(address, headers=headers), policy, URL_TIMEOUT_S) as response:
        if offset and response.status == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise PullError(f"{address}: asked for bytes from {offset}, sent from {start}")
        else:
            offset = 0  # a 200: the server ignored the Range, the body is the whole file
        length_text = response.headers.get("Content-Length")
        length = int(length_text) if length_text and length_text.isdigit() else None
        total = offset + length if length is not None else None
        if total is not None:
            cap.check(total, label, announced=True)
        received = 0
        with partial.open("ab" if offset else "wb") as out:
            on_progress(PullProgress("downloading", label, offset, total))
            while chunk := response.read(CHUNK_BYTES):
                cap.check(offset + received + len(chunk), label, announced=False)
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
