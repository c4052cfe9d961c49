"""A process that must not outlive its parent: an engine process and the server that started
it, a Ray replica and its node's raylet. When the parent goes, this process takes its own
children with it (vLLM's engine core; an engine process), then exits."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import psutil

WATCH_SECONDS = 0.5


def die_with_parent(parent_pid: int, *, last_words: Callable[[], None] | None = None) -> None:
    """Watch, on a thread of its own, for `parent_pid` to go (this process is then re-parented,
    to init or a subreaper); `last_words` runs first, if it can."""

    def watch() -> None:
        while os.getppid() == parent_pid and psutil.pid_exists(parent_pid):
            time.sleep(WATCH_SECONDS)
        if last_words is not None:
            with contextlib.suppress(Exception):
                last_words()
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
