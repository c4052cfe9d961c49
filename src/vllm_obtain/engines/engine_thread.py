"""The bridge between the event loop and an engine that runs on a thread of its own.

llama.cpp and MLX must be driven from one thread; requests reach it through a queue of jobs,
and its tokens come back through an asyncio queue per request. Closing the request's stream
marks the job cancelled, which the engine thread checks between steps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from vllm_obtain.contract import EngineError, EngineRequestError, GenerationRequest, TokenChunk


@dataclass
class Job:
    """One request in flight: its input, where its output goes, whether it is still wanted."""

    request: GenerationRequest
    emit: Callable[[TokenChunk | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


async def stream_job(
    jobs: queue.Queue[Job | None], request: GenerationRequest, engine_name: str
) -> AsyncGenerator[TokenChunk, None]:
    """Queue `request` for the engine thread and yield its chunks until the last one."""
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

    def emit(item: TokenChunk | BaseException) -> None:
        loop.call_soon_threadsafe(outputs.put_nowait, item)

    job = Job(request, emit)
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
