"""A loaded model as requests see it: its engine, what it accepts, its bounded queue, and its
chat prompt."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_obtain.contract import Engine, EngineState, ModelInfo
from vllm_obtain.core.templates import ChatTemplateError, render_chat_prompt
from vllm_obtain.core.tools import messages_with_tools, plain_messages, template_renders_tools


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
