"""The bridge between the event loop and an engine that runs on a thread of its own.

llama.cpp and MLX must be driven from one thread; requests reach it through a queue of jobs,
and its tokens come back through an asyncio queue per request. What a decoding step produces
for all its sequences crosses to the event loop at once (Courier): one wake-up of the loop per
step, not one per token per sequence. Closing the request's stream marks the job cancelled,
which the engine thread checks between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from vllm_obtain.contract import (
    ChunkQueue,
    EngineError,
    EngineRequestError,
    GenerationRequest,
    StreamItem,
    TokenChunk,
)


@dataclass
class Job:
    """One request in flight: its input, where its output goes, whether it is still wanted."""

    request: GenerationRequest
    emit: Callable[[StreamItem], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class Courier:
    """Carries the engine thread's outputs to the event loop, a step's worth at a time: `emit`
    (engine thread) holds them, `flush` (engine thread, at the end of each step) hands them all
    over in one call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held: list[tuple[ChunkQueue, StreamItem]] = []

    def job(self, request: GenerationRequest, outputs: ChunkQueue) -> Job:
        return Job(request, functools.partial(self._hold, outputs))

    def _hold(self, outputs: ChunkQueue, item: StreamItem) -> None:
        self._held.append((outputs, item))

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        # A closed loop (the engine is stopping): nobody is waiting for these any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_deliver, held)


def _deliver(held: list[tuple[ChunkQueue, StreamItem]]) -> None:
    for outputs, item in held:
        outputs.put(item)


async def stream_job(
    jobs: queue.Queue[Job | None], courier: Courier, request: GenerationRequest, engine_name: str
) -> AsyncGenerator[TokenChunk, None]:
    """Queue `request` for the engine thread and yield its chunks until the last one."""
    outputs = ChunkQueue()
    job = courier.job(request, outputs)
    jobs.put(job)
    try:
        while True:
            item = await outputs.get()
            if isinstance(item, EngineRequestError):
                raise item  # this request was refused: a 400, not an engine failure
            if isinstance(item, BaseException):
                raise EngineError(f"{engine_name} failed: {item}") from item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        job.cancelled.set()
