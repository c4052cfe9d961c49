"""From an engine's token stream to client text, for one or many choices.

One async generator per request: the same stream of ChoiceDelta feeds the collected JSON answer
and the SSE answer, so the two can never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from vllm_obtain.contract import Engine, FinishReason, GenerationRequest, TokenLogprob
from vllm_obtain.core.planning import Plan
from vllm_obtain.core.served_model import ServedModel
from vllm_obtain.core.textstream import TextStream


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """Text ready for the client, for one choice: the unit response shaping works on."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens behind this text, when asked for


# One request's text as it becomes ready; closing the generator cancels the generation.
Deltas = AsyncGenerator[ChoiceDelta, None]


def run_plan(model: ServedModel, plan: Plan) -> Deltas:
    """All the choices of a planned request as one stream: admitted against the model's bounded
    queue (a full queue is refused before any answer), cut off at its request timeout."""
    deltas = generate_choices(model.engine, plan.choices, plan.stops)
    deltas = before_deadline(deltas, model.limits.request_timeout)
    return admitted(model, len(plan.choices), deltas)


async def stream_choice(
    engine: Engine, request: GenerationRequest, *, index: int, stops: Sequence[str]
) -> Deltas:
    """Generate one choice; stop strings cut the text and end the generation early."""
    text = TextStream(stops)
    produced = 0
    # Logprobs of tokens whose text is still held back travel with the text when it is sent.
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens = engine.generate(request)
    try:
        async for chunk in tokens:
            produced += len(chunk.token_ids)
            logprobs += chunk.logprobs
            delta = text.feed(chunk.piece)
            if text.stopped:
                yield ChoiceDelta(index, delta, "stop", produced, logprobs)
                return
            if chunk.finish_reason is not None:
                delta += text.finish()
                yield ChoiceDelta(index, delta, chunk.finish_reason, produced, logprobs)
                return
            if delta:
                yield ChoiceDelta(index, delta, None, produced, logprobs)
                logprobs = ()
    finally:
        # Closing the engine's stream is what cancels the generation (stop string, client gone).
        await tokens.aclose()


async def merge_streams(streams: Sequence[Deltas]) -> Deltas:
    """Interleave several choice streams as their items arrive; cancel them all on exit."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()

    async def pump(stream: Deltas) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            received = await queue.get()
            if received is None:
                remaining -= 1
            elif isinstance(received, BaseException):
                raise received
            else:
                yield received
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def generate_choices(
    engine: Engine,
    requests: Sequence[tuple[int, GenerationRequest]],
    stops: Sequence[str],
) -> Deltas:
    """All choices of one API request, each (index, request), merged into one stream."""
    return merge_streams(
        [stream_choice(engine, request, index=index, stops=stops) for index, request in requests]
    )


class GenerationTimeoutError(TimeoutError):
    """The request ran past the server's request timeout."""


async def before_deadline(deltas: Deltas, seconds: float) -> Deltas:
    """Pass the deltas through until `seconds` have passed, then cancel the generation."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while True:
            try:
                delta = await asyncio.wait_for(anext(deltas), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise GenerationTimeoutError(
                    f"The request did not finish within the server's timeout ({seconds:g}s)."
                ) from None
            yield delta
    finally:
        await deltas.aclose()


async def admitted(model: ServedModel, sequences: int, deltas: Deltas) -> Deltas:
    """Hold `sequences` places in the model's bounded queue while the deltas flow. Admission
    happens at the first item, so a full queue (QueueFullError) is raised before any answer."""
    model.admit(sequences)
    try:
        async for delta in deltas:
            yield delta
    finally:
        model.release(sequences)
        await deltas.aclose()
