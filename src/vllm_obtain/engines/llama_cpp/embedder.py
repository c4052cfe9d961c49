"""Sentence embeddings with llama.cpp's embedding mode (a BERT-family GGUF, pooled by llama.cpp
as the model's config says, L2-normalised as sentence-transformers and OpenAI return them).

Inputs are packed several to a `llama_decode` call, one sequence each, as llama.cpp's own server
does; the context is used from one thread at a time.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from vllm_obtain.contract import EmbeddingModelInfo, EngineNotInstalledError, EngineState

# Sequences, and tokens, per decode call: enough to batch a client's list of chunks.
MAX_SEQUENCES = 16
BATCH_TOKENS = 2048


class LlamaCppEmbedder:
    """Serves one embedding GGUF."""

    name = "llama.cpp"
    state: EngineState = "ready"

    def __init__(self, model_path: Path, *, threads: int | None = None) -> None:
        self.model_path = Path(model_path)
        self._threads = threads or os.cpu_count() or 1
        self._llama: Any = None
        self._lock = asyncio.Lock()

    async def load(self) -> EmbeddingModelInfo:
        try:
            import llama_cpp
        except ImportError as exc:
            raise EngineNotInstalledError(
                "embeddings need llama.cpp: ./install.sh --engines llama.cpp"
            ) from exc
        self._llama = await asyncio.to_thread(
            llama_cpp.Llama,
            str(self.model_path),
            embedding=True,
            n_ctx=BATCH_TOKENS,
            n_batch=BATCH_TOKENS,
            n_ubatch=BATCH_TOKENS,  # a non-causal model sees each input in one micro-batch
            n_seq_max=MAX_SEQUENCES,
            n_threads=self._threads,
            n_threads_batch=self._threads,
            verbose=False,
        )
        info = EmbeddingModelInfo(
            dimensions=self._llama.n_embd(),
            context_length=min(self._llama._model.n_ctx_train(), BATCH_TOKENS),
            vocab_size=self._llama.n_vocab(),
        )
        logger.info("llama.cpp loaded embedding model {} ({} dimensions)",
                    self.model_path.name, info.dimensions)  # fmt: skip
        return info

    async def unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The tokens of `text` as the model sees it, [CLS] and [SEP] included."""
        tokens: list[int] = self._llama.tokenize(
            text.encode("utf-8"), add_bos=add_special, special=False
        )
        return tokens

    def stats(self) -> dict[str, float]:
        return {"running": int(self._lock.locked()), "waiting": 0}

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per token list (each within context_length)."""
        async with self._lock:
            return await asyncio.to_thread(self._embed, inputs)

    def _embed(self, inputs: list[list[int]]) -> list[list[float]]:
        import llama_cpp

        llama = self._llama
        batch, ctx, size = llama._batch, llama._ctx, llama.n_batch
        vectors: list[list[float]] = []
        start = 0
        while start < len(inputs):
            group: list[list[int]] = []
            used = 0
            for tokens in inputs[start : start + MAX_SEQUENCES]:
                if group and used + len(tokens) > size:
                    break
                group.append(tokens)
                used += len(tokens)
            batch.reset()
            for seq_id, tokens in enumerate(group):
                batch.add_sequence(tokens, seq_id, True)
            ctx.kv_cache_clear()
            ctx.decode(batch)
            for seq_id in range(len(group)):
                raw = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq_id)
                vector = np.ctypeslib.as_array(raw, shape=(llama.n_embd(),)).astype(np.float64)
                norm = np.linalg.norm(vector)
                vectors.append((vector / norm if norm else vector).tolist())
            start += len(group)
        return vectors
