"""A deterministic stand-in engine for API-layer tests. It is not a model: it replies with a
scripted text, one token per character, so tests can pin framing, errors and cancellation
exactly. Everything a user would see from a model is tested on the real engine in integration/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from vllm_obtain.contract import (
    EngineError,
    EngineRequestError,
    EngineState,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
    TokenLogprob,
)

TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def scripted_logprobs(char: str, request: GenerationRequest) -> tuple[TokenLogprob, ...]:
    """Each character is given logprob -1.0; the alternatives are "a", "b", ... at -2, -3, ..."""
    if request.logprobs is None:
        return ()
    top = tuple((c.encode(), -2.0 - i) for i, c in enumerate("abcdefghijklmnopqrst"))
    return (TokenLogprob(char.encode(), -1.0, top[: request.logprobs]),)


class ScriptedEngine:
    name = "scripted"
    supported_params = frozenset({"temperature", "top_p", "seed"})
    state: EngineState = "ready"

    def __init__(
        self,
        reply: str = "Hello there, world!",
        *,
        fail_after: int | None = None,
        endless: bool = False,
        context_length: int = 256,
        max_running: int = 4,
        delay: float = 0.0,
        supports: frozenset[str] = frozenset(),
        refuse: EngineRequestError | None = None,
    ) -> None:
        self.reply = reply
        self.fail_after = fail_after  # raise EngineError after this many tokens
        self.endless = endless  # never finish, not even at max_tokens: only cancellation ends it
        self.context_length = context_length
        self.max_running = max_running
        self.delay = delay  # seconds per token: keeps requests in flight for queueing tests
        self.supported_params = ScriptedEngine.supported_params | supports
        self.refuse = refuse  # raised before the first token, as an engine refuses a request
        self.running = 0
        self.cancelled = 0
        self.requests: list[GenerationRequest] = []

    async def load(self) -> ModelInfo:
        return ModelInfo(
            context_length=self.context_length,
            vocab_size=0x110000,
            chat_template=TEMPLATE,
            bos_token="<s>",
            eos_token="</s>",
        )

    async def unload(self) -> None:
        return None

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return [ord(c) for c in text]

    def stats(self) -> dict[str, float]:
        return {"running": self.running, "waiting": 0}

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        self.requests.append(request)
        if self.refuse is not None:
            raise self.refuse
        self.running += 1
        finished = False
        try:
            produced = 0
            while True:
                await asyncio.sleep(self.delay or (0.001 if self.endless else 0))
                if self.fail_after is not None and produced >= self.fail_after:
                    raise EngineError("scripted failure")
                if not self.endless and produced >= len(self.reply):
                    finished = True
                    yield TokenChunk((0,), b"", "stop")
                    return
                char = self.reply[produced % len(self.reply)]
                produced += 1
                out_of_room = produced >= request.max_tokens and not self.endless
                reason: FinishReason | None = "length" if out_of_room else None
                finished = reason is not None
                yield TokenChunk(
                    (ord(char),), char.encode(), reason, scripted_logprobs(char, request)
                )
                if finished:
                    return
        finally:
            self.running -= 1
            if not finished:
                self.cancelled += 1
