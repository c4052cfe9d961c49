"""llama.cpp's own log: kept out of the server's output, but read. The line that says how many
layers went to the GPU is the one fact an operator needs from it at load, and its errors are
passed on as warnings."""

from __future__ import annotations

import ctypes
import re
from typing import Any

from loguru import logger

_OFFLOADED = re.compile(rb"offloaded (\d+)/(\d+) layers to GPU")
_ERROR = 3  # ggml_log_level: GGML_LOG_LEVEL_ERROR
# Said of every unified pool larger than the model's context; the scheduler keeps each request
# within that context, so it would only alarm an operator.
_POOL_NOT_CONTEXT = re.compile(rb"n_ctx_seq \(\d+\) > n_ctx_train")

# (offloaded, total) from the last model load, when llama.cpp said it.
last_offload: tuple[int, int] | None = None
_callback: Any = None  # must outlive every native call that may log


def install(lib: Any) -> None:
    """Route llama.cpp's log through here (once per process)."""
    global _callback
    if _callback is not None:
        return

    def on_log(level: int, text: bytes, _user_data: Any) -> None:
        global last_offload
        if (found := _OFFLOADED.search(text or b"")) is not None:
            last_offload = (int(found.group(1)), int(found.group(2)))
        elif level == _ERROR and not _POOL_NOT_CONTEXT.search(text or b""):
            logger.warning("llama.cpp: {}", (text or b"").decode(errors="replace").strip())

    _callback = lib.llama_log_callback(on_log)
    lib.llama_log_set(_callback, ctypes.c_void_p(0))


def describe_offload(lib: Any, requested_layers: int) -> str:
    """Where the model's layers run, for the load log line."""
    if not lib.llama_supports_gpu_offload():
        return "on the CPU (this llama.cpp build has no GPU backend)"
    if last_offload is None:
        return "on the CPU" if requested_layers == 0 else "with no GPU offload reported"
    offloaded, total = last_offload
    if offloaded == 0:
        return f"on the CPU (0/{total} layers offloaded; --gpu-layers {requested_layers})"
    return f"with {offloaded}/{total} layers on the GPU"
