"""Which models are served, under which id, on which engine; loading and unloading them.

This is the seed of the many-model manager: today the server holds one chat model."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from vllm_obtain.contract import Engine, EngineState, EngineUnavailableError, ModelInfo
from vllm_obtain.core.templates import ChatTemplateError, render_chat_prompt
from vllm_obtain.core.tools import messages_with_tools, plain_messages, template_renders_tools


class UnknownModelError(LookupError):
    """A request named a model this server does not serve."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"The model '{model_id}' does not exist or is not served here.")
        self.model_id = model_id


class QueueFullError(RuntimeError):
    """More requests than the model runs and queues at once: the client should retry (429)."""

    def __init__(self, model_id: str, retry_after: int = 2) -> None:
        super().__init__(
            f"The model '{model_id}' is at capacity: too many requests are waiting. "
            "Retry after a short wait."
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServingLimits:
    """What one model accepts; 0 means 'as far as the context goes'."""

    max_queue: int = 256  # sequences that may wait beyond those the engine runs at once
    request_timeout: float = 600.0  # seconds, queueing included
    max_prompt_tokens: int = 0
    max_tokens: int = 0


@dataclass
class ServedModel:
    id: str
    engine: Engine
    info: ModelInfo | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm-obtain"
    chat_template: str | None = None  # replaces the model's own (--chat-template)
    limits: ServingLimits = field(default_factory=ServingLimits)
    in_flight: int = 0  # sequences admitted and not finished, running or waiting
    load_error: str | None = None

    @property
    def state(self) -> EngineState:
        if self.info is None:
            return "failed" if self.load_error is not None else "loading"
        return self.engine.state

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.engine.max_running)

    def admit(self, sequences: int) -> None:
        """Take room for `sequences` more, or refuse: the queue is bounded, not the backlog."""
        if self.in_flight + sequences > self.engine.max_running + self.limits.max_queue:
            raise QueueFullError(self.id)
        self.in_flight += sequences

    def release(self, sequences: int) -> None:
        self.in_flight -= sequences

    @property
    def loaded_info(self) -> ModelInfo:
        if self.info is None:
            raise RuntimeError(f"model {self.id} is not loaded")
        return self.info

    async def chat_prompt_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> list[int]:
        """Render a conversation (and the tools offered) with the model's own chat template
        and tokenize it."""
        info = self.loaded_info
        template = self.chat_template or info.chat_template
        if template is None:
            raise ChatTemplateError(
                f"The model '{self.id}' has no chat template; use /v1/completions, or serve it "
                "with --chat-template."
            )
        if not template_renders_tools(template):
            messages = messages_with_tools(messages, tools) if tools else plain_messages(messages)
            tools = ()
        prompt = render_chat_prompt(
            template, messages, bos_token=info.bos_token, eos_token=info.eos_token, tools=tools
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
        if model is None:
            raise UnknownModelError(model_id)
        if model.info is None:
            raise EngineUnavailableError(
                f"The model '{model_id}' is {model.state}; retry shortly.", retry_after=10
            )
        return model

    def all(self) -> list[ServedModel]:
        return list(self._models.values())

    def loaded(self) -> list[ServedModel]:
        return [m for m in self._models.values() if m.info is not None]

    async def load_all(self) -> None:
        """Load every model in turn; one that fails is marked failed and the error raised."""
        for model in self._models.values():
            if model.info is None:
                started = time.perf_counter()
                try:
                    model.info = await model.engine.load()
                except Exception as exc:
                    model.load_error = f"{type(exc).__name__}: {exc}"
                    logger.opt(exception=exc).critical("{} failed to load: {}", model.id, exc)
                    raise
                logger.info(
                    "serving {} on {} ({:.1f}s to load)",
                    model.id,
                    model.engine.name,
                    time.perf_counter() - started,
                )

    async def unload_all(self) -> None:
        # Every engine, loaded or not: one interrupted mid-load may hold a process already.
        for model in self._models.values():
            await model.engine.unload()
            model.info = None
