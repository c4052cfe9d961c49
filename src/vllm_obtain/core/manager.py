"""Which models are served, under which id, on which engine; loading and unloading them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from vllm_obtain.core.requests import ModelInfo
from vllm_obtain.core.templates import ChatTemplateError, render_chat_prompt
from vllm_obtain.engines.base import Engine


class UnknownModelError(LookupError):
    """A request named a model this server does not serve."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"The model '{model_id}' does not exist or is not served here.")
        self.model_id = model_id


@dataclass
class ServedModel:
    id: str
    engine: Engine
    info: ModelInfo | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm-obtain"
    chat_template: str | None = None  # replaces the model's own (--chat-template)

    @property
    def loaded_info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError(f"model {self.id} is not loaded")
        return self.info

    async def chat_prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Render a conversation with the model's own chat template and tokenize it."""
        info = self.loaded_info
        template = self.chat_template or info.chat_template
        if template is None:
            raise ChatTemplateError(
                f"The model '{self.id}' has no chat template; use /v1/completions, or serve it "
                "with --chat-template."
            )
        prompt = render_chat_prompt(
            template, messages, bos_token=info.bos_token, eos_token=info.eos_token
        )
        # The template writes any BOS the model wants itself, as transformers assumes.
        return await self.engine.tokenize(prompt, add_special=False)


class ModelRegistry:
    """The models this server answers for, by id."""

    def __init__(self, models: list[ServedModel] | None = None) -> None:
        self._models = {m.id: m for m in models or []}

    def add(self, model: ServedModel) -> None:
        self._models[model.id] = model

    def get(self, model_id: str) -> ServedModel:
        model = self._models.get(model_id)
        if model is None or model.info is None:
            raise UnknownModelError(model_id)
        return model

    def loaded(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.info is not None]

    async def load_all(self) -> None:
        for model in self._models.values():
            if model.info is None:
                started = time.perf_counter()
                model.info = await model.engine.load()
                logger.info(
                    "serving {} on {} ({:.1f}s to load)",
                    model.id,
                    model.engine.name,
                    time.perf_counter() - started,
                )

    async def unload_all(self) -> None:
        for model in self._models.values():
            if model.info is not None:
                await model.engine.unload()
                model.info = None
