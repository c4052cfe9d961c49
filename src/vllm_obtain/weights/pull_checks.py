"""What every pull shares: its progress reports, its errors, and the checksum check."""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vllm_obtain.weights.inventory import (
    remove_hub_files,
)

CHUNK_BYTES = 1 << 20
POLL_S = 0.25  # how often a Hub download's progress is read off its .incomplete blob
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PullProgress:
    status: Literal["resolving", "downloading", "verifying", "done"]
    file: str
    completed: int  # bytes
    total: int | None  # bytes, when known


class PullError(RuntimeError):
    """A pull that failed; the message says what went wrong and what to do."""


Progress = Callable[[PullProgress], None]


def verify(
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
    actual = sha256_of(path, label, on_progress)
    if actual == expected:
        return
    if discard is not None and discard == path:
        path.unlink(missing_ok=True)
        remove_if_empty(path.parent)
        fate = "it was deleted; pull again (or check the sha256 you gave)"
    elif discard is not None:
        remove_hub_files(path, discard)
        fate = "it was deleted from the cache; pull again"
    else:
        fate = f"{path} is left as it was: vllm-obtain rm it, then pull again"
    raise PullError(f"{label}: its sha256 is {actual}, not {expected} ({what}): {fate}")


def sha256_of(path: Path, label: str, on_progress: Progress) -> str:
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


def report_done(label: str, size: int | None, on_progress: Progress) -> None:
    on_progress(PullProgress("done", label, size or 0, size))


def remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another pull's .part), or gone
        folder.rmdir()


def sha256_digest(text: str, where: str) -> str:
    """`text` as a sha256 digest (64 hex digits, `sha256:` allowed); `where` it came from."""
    digest = text.strip().lower().removeprefix("sha256:")
    if not _SHA256.match(digest):
        raise PullError(f"{where} wants a sha256 of 64 hex digits, not '{text}'")
    return digest
