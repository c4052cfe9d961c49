"""llama.cpp through llama-cpp-python: GGUF models on CPU, CUDA, Metal or ROCm.

llama.cpp is not thread-safe per context, so one dedicated thread owns the model and context and
runs the generations; the event loop only exchanges plain data with it through queues.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import queue
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loguru import logger

from vllm_obtain.core.requests import GenerationRequest, ModelInfo, TokenChunk
from vllm_obtain.engines.base import STANDARD_SAMPLING, EngineError, EngineNotInstalledError
from vllm_obtain.engines.worker_thread import Job, stream_job

# llama.cpp reserves this seed value for "pick a random seed"; a client's seed must never mean that.
_LLAMA_RANDOM_SEED = 0xFFFFFFFF


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise EngineNotInstalledError(
            "llama.cpp engine needs llama-cpp-python: run ./install.sh (it builds it for this CPU)"
        ) from exc
    return llama_cpp


def client_seed_to_llama(seed: int | None) -> int:
    """Map an OpenAI seed (any int64, or none) to llama.cpp's uint32 sampler seed."""
    if seed is None:
        return random.getrandbits(31)
    value = seed & 0xFFFFFFFF
    return value - 1 if value == _LLAMA_RANDOM_SEED else value


class LlamaCppEngine:
    """Serves one GGUF model; requests run one at a time on the engine thread."""

    name = "llama.cpp"
    supported_params = STANDARD_SAMPLING

    def __init__(
        self,
        model_path: Path,
        *,
        context_length: int = 0,
        threads: int | None = None,
        batch_size: int = 512,
        gpu_layers: int = 0,
    ) -> None:
        self.model_path = Path(model_path)
        self._context_length = context_length
        self._threads = threads or os.cpu_count() or 1
        self._batch_size = batch_size
        self._gpu_layers = gpu_layers
        self._llama: Any = None
        self._lib: Any = None
        self._pieces: list[bytes] = []
        self._is_eog: list[bool] = []
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = 0

    async def load(self) -> ModelInfo:
        self._lib = _import_llama_cpp()
        self._llama = await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._serve, name="llama.cpp-engine", daemon=True)
        self._thread.start()
        meta = self._llama.metadata
        return ModelInfo(
            context_length=self._llama.n_ctx(),
            vocab_size=self._llama.n_vocab(),
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=self._special_text(self._llama.token_bos()),
            eos_token=self._special_text(self._llama.token_eos()),
        )

    def _open(self) -> Any:
        llama = self._lib.Llama(
            model_path=str(self.model_path),
            n_ctx=self._context_length,  # 0: the context length the model was trained with
            n_batch=self._batch_size,
            n_threads=self._threads,
            n_threads_batch=self._threads,
            n_gpu_layers=self._gpu_layers,
            verbose=False,
        )
        vocab = llama._model.vocab
        # Computed once per model so the per-token work is a list lookup.
        self._pieces = [self._token_piece(vocab, t) for t in range(llama.n_vocab())]
        self._is_eog = [
            bool(self._lib.llama_vocab_is_eog(vocab, t)) for t in range(llama.n_vocab())
        ]
        logger.info(
            "llama.cpp loaded {} (context {}, {} threads)",
            self.model_path.name,
            llama.n_ctx(),
            self._threads,
        )
        return llama

    def _token_piece(self, vocab: Any, token: int, size: int = 64) -> bytes:
        buf = ctypes.create_string_buffer(size)
        n = self._lib.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n < 0:  # buffer too small: llama.cpp returns the size it needs, negated
            return self._token_piece(vocab, token, -n)
        return buf.raw[:n]

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text: str = self._llama._model.token_get_text(token)
        return text

    async def unload(self) -> None:
        if self._thread is None:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._llama.close()
        self._llama = None

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        tokens: list[int] = await asyncio.to_thread(
            self._llama.tokenize, text.encode("utf-8"), add_special, True
        )
        return tokens

    def stats(self) -> dict[str, int]:
        return {"running": self._running, "waiting": self._jobs.qsize()}

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        if self._thread is None:
            raise EngineError("the llama.cpp engine is not running")
        return stream_job(self._jobs, request, self.name)

    # --- engine thread -------------------------------------------------------------------

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self._running = 1
            try:
                self._run(job)
            except Exception as exc:
                logger.exception("llama.cpp failed on request {}", job.request.request_id)
                job.emit(exc)
            finally:
                self._running = 0

    def _run(self, job: Job) -> None:
        request, sampling, llama = job.request, job.request.sampling, self._llama
        llama.set_seed(client_seed_to_llama(sampling.seed))
        # Evaluate every prompt from scratch: the same prompt and seed then give the same
        # tokens no matter what ran before (prefix reuse comes with the batching scheduler).
        llama.reset()
        tokens = llama.generate(
            list(request.prompt_tokens),
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,  # OpenAI has no top-k; 0 disables llama.cpp's default of 40
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        for produced, token in enumerate(tokens, start=1):
            if job.cancelled.is_set():
                return
            if self._is_eog[token] and not sampling.ignore_eos:
                job.emit(TokenChunk((token,), b"", "stop"))
                return
            out_of_room = produced >= request.max_tokens or llama.n_tokens >= llama.n_ctx()
            job.emit(TokenChunk((token,), self._pieces[token], "length" if out_of_room else None))
            if out_of_room:
                return
