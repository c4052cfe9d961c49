"""Shaping a stream of ChoiceDelta into an answer: collected into one JSON body, or SSE-framed."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from loguru import logger
from pydantic import BaseModel

from vllm_obtain.api.errors import ClientGoneError, as_openai_error
from vllm_obtain.api.protocol import Usage
from vllm_obtain.contract import FinishReason, TokenLogprob
from vllm_obtain.core.generation import Deltas

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ResponseMeta:
    """What every object of one response shares: the same id and timestamp on each chunk."""

    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str, prompt_tokens: int) -> ResponseMeta:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", model=model, prompt_tokens=prompt_tokens)

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )


@dataclass
class CollectedChoice:
    text: str = ""
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


async def collect_choices(deltas: Deltas, count: int) -> list[CollectedChoice]:
    """Run the stream to its end and gather each choice's whole text."""
    choices = [CollectedChoice() for _ in range(count)]
    async for delta in deltas:
        choice = choices[delta.index]
        choice.text += delta.text
        choice.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.completion_tokens = delta.completion_tokens
    return choices


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first: a non-streamed request
    whose client has gone stops generating, as a stream does."""
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        # The body has been read: what receive() gives next is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGoneError
    return task.result()


async def primed(deltas: Deltas) -> Deltas:
    """Wait for the first delta before answering, so a failure before any token is a plain
    error response with its status code instead of an error inside a 200 stream."""
    first = await anext(deltas)

    async def chained() -> Deltas:
        try:
            yield first
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()

    return chained()


async def sse_frames(
    objects: AsyncGenerator[BaseModel, None], *, named: bool = False
) -> AsyncGenerator[str, None]:
    """`data: {json}` per object, then `data: [DONE]`; a failure mid-stream becomes an error
    event (the OpenAI SDKs raise it as APIError) rather than a silently truncated answer.
    `named`: the Responses API's framing, `event: <type>` before each object and no [DONE]."""
    try:
        async for obj in objects:
            data = obj.model_dump_json()
            yield (
                f"event: {getattr(obj, 'type', '')}\ndata: {data}\n\n"
                if named
                else f"data: {data}\n\n"
            )
    except Exception as exc:
        error = as_openai_error(exc)
        logger.opt(exception=exc).error("stream failed: {}", exc)
        yield f"data: {error.envelope().model_dump_json()}\n\n"
    finally:
        await objects.aclose()
    if not named:
        yield "data: [DONE]\n\n"


def sse_response(
    objects: AsyncGenerator[BaseModel, None], *, named: bool = False
) -> StreamingResponse:
    return StreamingResponse(
        sse_frames(objects, named=named), media_type="text/event-stream", headers=SSE_HEADERS
    )
