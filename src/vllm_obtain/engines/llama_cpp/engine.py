"""llama.cpp through llama-cpp-python's low-level API: GGUF models on CPU, CUDA, Metal or ROCm.

A llama.cpp context is not thread-safe, so one dedicated thread owns the model, the context and
the batch scheduler (scheduler.py); the event loop exchanges plain data with it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import queue
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from loguru import logger

from vllm_obtain.contract import (
    CONSTRAINED_OUTPUT,
    PROGRESS_STAT,
    STANDARD_SAMPLING,
    EngineError,
    EngineNotInstalledError,
    EngineState,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
)
from vllm_obtain.contract.kv_layout import auto_kv_tokens
from vllm_obtain.engines.engine_thread import Courier, Job, stream_job
from vllm_obtain.engines.llama_cpp import native_log
from vllm_obtain.engines.llama_cpp.sampling import SequenceSampler
from vllm_obtain.engines.llama_cpp.scheduler import BatchScheduler
from vllm_obtain.engines.llama_cpp.step_sampling import (
    PlainSampler,
    Sampler,
    is_plain,
    step_sampler,
)


def _import_llama_cpp() -> tuple[Any, Any]:
    try:
        import llama_cpp
        from llama_cpp import _internals
    except ImportError as exc:
        raise EngineNotInstalledError(
            "llama.cpp engine needs llama-cpp-python: run ./install.sh (it builds it for this CPU)"
        ) from exc
    native_log.install(llama_cpp)
    llama_cpp.llama_backend_init()
    return llama_cpp, _internals


class LlamaCppEngine:
    """Serves one GGUF model; concurrent requests share each decoding step."""

    name = "llama.cpp"
    supported_params = STANDARD_SAMPLING | CONSTRAINED_OUTPUT | {"logprobs", "logit_bias"}
    state: EngineState = "ready"

    def __init__(
        self,
        model_path: Path,
        *,
        context_length: int = 0,
        threads: int | None = None,
        batch_size: int = 512,
        gpu_layers: int = 0,
        parallel: int = 16,
        kv_cache_tokens: int = 0,
        kv_unified: bool = True,
    ) -> None:
        self.model_path = Path(model_path)
        self._context_length = context_length
        self._threads = threads or os.cpu_count() or 1
        self._batch_size = batch_size
        self._gpu_layers = gpu_layers
        self._parallel = parallel
        self.max_running = parallel
        self._kv_cache_tokens = kv_cache_tokens
        self._kv_unified = kv_unified
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._scheduler: BatchScheduler | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._courier: Courier | None = None
        self._thread: threading.Thread | None = None

    async def load(self) -> ModelInfo:
        self._lib, internals = _import_llama_cpp()
        self._courier = Courier(asyncio.get_running_loop())
        info = await asyncio.to_thread(self._open, internals)
        self._thread = threading.Thread(target=self._serve, name="llama.cpp-engine", daemon=True)
        self._thread.start()
        return info

    def _open(self, internals: Any) -> ModelInfo:
        lib = self._lib
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = self._gpu_layers
        self._model = internals.LlamaModel(
            path_model=str(self.model_path), params=model_params, verbose=False
        )
        model = self._model
        context = self._context_length or model.n_ctx_train()
        kv_tokens = self._kv_cache_tokens or auto_kv_tokens(context, self._parallel)
        params = lib.llama_context_default_params()
        # Split, each slot gets an equal share (llama.cpp wants n_ctx a multiple of them).
        params.n_ctx = (
            kv_tokens if self._kv_unified else kv_tokens // self._parallel * self._parallel
        )
        params.n_batch = params.n_ubatch = self._batch_size
        params.n_seq_max = self._parallel
        params.kv_unified = self._kv_unified
        params.n_threads = params.n_threads_batch = self._threads
        self._ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        # What one request may hold: the whole pool, or its slot's share.
        room = self._ctx.n_ctx() if self._kv_unified else lib.llama_n_ctx_seq(self._ctx.ctx)
        usable = min(context, room)
        vocab, n_vocab = model.vocab, model.n_vocab()
        # Computed once per model so the per-token work is a list lookup.
        pieces = [self._token_piece(vocab, t) for t in range(n_vocab)]
        is_eog = [bool(lib.llama_vocab_is_eog(vocab, t)) for t in range(n_vocab)]

        def make_sampler(request: GenerationRequest) -> Sampler:
            if is_plain(request):
                return PlainSampler.for_request(request)
            return SequenceSampler(lib, internals, vocab, request, pieces)

        assert self._courier is not None
        self._scheduler = BatchScheduler(
            lib,
            self._ctx,
            make_sampler=make_sampler,
            pieces=pieces,
            is_eog=is_eog,
            n_slots=self._parallel,
            kv_tokens=room,
            batch_size=self._batch_size,
            unified=self._kv_unified,
            # Idle caches beyond one context's worth slow every running token more than they
            # are likely to save: the most recently used conversation stays whole.
            idle_cache_tokens=usable,
            sample_step=step_sampler(lib, n_vocab),
            flush=self._courier.flush,
        )
        logger.info(
            "llama.cpp loaded {} {} (context {}, KV cache {} tokens {}, {} parallel, {} threads)",
            self.model_path.name,
            native_log.describe_offload(lib, self._gpu_layers),
            usable,
            self._ctx.n_ctx(),
            "in one pool" if self._kv_unified else f"split into {room} per slot",
            self._parallel,
            self._threads,
        )
        if room < context:
            logger.info(
                "a request may hold {} tokens, {} (the model's own context is {}): a larger "
                "--kv-cache-tokens or --memory-budget gives more",
                room,
                "the whole KV cache" if self._kv_unified else "its slot's share of the KV cache",
                context,
            )
        return ModelInfo(
            context_length=usable,
            vocab_size=n_vocab,
            chat_template=model.metadata().get("tokenizer.chat_template"),
            bos_token=self._special_text(model.token_bos()),
            eos_token=self._special_text(model.token_eos()),
        )

    def _token_piece(self, vocab: Any, token: int, size: int = 64) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = self._lib.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n < 0:  # buffer too small: llama.cpp returns the size it needs, negated
            return self._token_piece(vocab, token, -n)
        return buf.raw[:n]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text: str = self._model.token_get_text(token)
        return text

    async def unload(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._ctx.close()
        self._model.close()

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        tokens: list[int] = await asyncio.to_thread(
            self._model.tokenize, text.encode("utf-8"), add_special, True
        )
        return tokens

    def stats(self) -> dict[str, float]:
        scheduler = self._scheduler
        if scheduler is None:
            return {"running": 0, "waiting": self._jobs.qsize()}
        return {
            "running": scheduler.running,
            "waiting": len(scheduler.waiting) + scheduler.preempted + self._jobs.qsize(),
            "kv_cache_usage": min(1.0, scheduler.kv_reserved / self._ctx.n_ctx()),
            "prefix_tokens_reused": scheduler.prefix_tokens_reused,
            "preemptions": scheduler.preemptions,
            PROGRESS_STAT: scheduler.evaluated_tokens,
        }

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        if self._thread is None or self._courier is None:
            raise EngineError("the llama.cpp engine is not running")
        return stream_job(self._jobs, self._courier, request, self.name)

    def _serve(self) -> None:
        assert self._scheduler is not None
        try:
            self._scheduler.serve(self._jobs)
        finally:
            self._scheduler.close()
