"""The embedding models this server serves, beside its generation models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from vllm_obtain.contract import Embedder, EmbeddingModelInfo, EngineState, EngineUnavailableError


@dataclass
class ServedEmbedder:
    """An embedding model: its id, where its weights come from (resolved when it loads, as
    that may convert them), and its engine once loaded."""

    id: str
    weights: Callable[[], Path]
    make_embedder: Callable[[Path], Embedder]
    engine_name: str = ""  # for /health, known before the model loads
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm-obtain"
    embedder: Embedder | None = None
    info: EmbeddingModelInfo | None = None
    load_error: str | None = None

    async def load(self) -> None:
        try:
            path = await asyncio.to_thread(self.weights)
            embedder = self.make_embedder(path)
            self.info = await embedder.load()
            self.embedder = embedder
        except Exception as exc:  # the chat models still serve; /v1/embeddings says why not
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("embedding model {} could not load: {}", self.id, self.load_error)

    @property
    def state(self) -> EngineState:
        if self.load_error is not None:
            return "failed"
        if self.embedder is None:
            return "loading"
        return self.embedder.state

    def stats(self) -> dict[str, float]:
        return self.embedder.stats() if self.embedder is not None else {}

    def ready(self) -> tuple[Embedder, EmbeddingModelInfo]:
        if self.embedder is None or self.info is None:
            reason = self.load_error or "it is still loading"
            raise EngineUnavailableError(f"The embedding model '{self.id}' is not ready: {reason}")
        if self.state != "ready":
            raise EngineUnavailableError(f"The embedding model '{self.id}' is {self.state}.")
        return self.embedder, self.info


@dataclass
class EmbeddingModels:
    models: list[ServedEmbedder] = field(default_factory=list)

    def find(self, model_id: str) -> ServedEmbedder | None:
        return next((m for m in self.models if m.id == model_id), None)

    async def load_all(self) -> None:
        await asyncio.gather(*(m.load() for m in self.models))

    async def unload_all(self) -> None:
        for model in self.models:
            if model.embedder is not None:
                await model.embedder.unload()
                model.embedder = None
