"""The engine's own process: it builds one engine and serves the server's messages over stdin and
stdout (runtime.wire). Run as `python -m vllm_obtain.runtime.child`.

A fault in native code (a segfault in llama.cpp, a GPU driver abort) then kills this process,
not the HTTP server: the supervisor sees it exit, fails the requests it had in flight, and
starts a new one. This is the only module of the runtime that learns backends (through the
engine registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, BinaryIO

from loguru import logger

from vllm_obtain.contract import Embedder, Engine, EngineError, TokenChunk
from vllm_obtain.logs import InterceptHandler
from vllm_obtain.runtime.parent_watch import die_with_parent
from vllm_obtain.runtime.wire import (
    Cancel,
    Chunks,
    Embed,
    ErrorReport,
    Failed,
    FromEngine,
    Generate,
    LoadFailed,
    Log,
    Ready,
    Shutdown,
    Start,
    Stats,
    ToEngine,
    Tokenize,
    Tokens,
    Vectors,
    encode_frame,
    read_frame,
)

HEARTBEAT_SECONDS = 1.0

Send = Callable[[FromEngine], None]


def build_from_registry(start: Start) -> Engine | Embedder:
    """The engine a Start message asks for, from the engine registry."""
    from vllm_obtain.engines.registry import build_embedder, build_engine

    if start.role == "embed":
        return build_embedder(start.model_path, start.config)
    return build_engine(start.engine, start.model_path, start.config)


class EngineHost:
    """Serves one engine: loads it, then answers messages until told to stop or the server goes
    away. Every request runs as a task of its own, forgotten as soon as it is done.

    The chunks the requests yield in one turn of the event loop (an engine hands a whole
    decoding step over at once) leave as one Chunks message at the end of that turn."""

    def __init__(self, engine: Engine | Embedder, send: Send) -> None:
        """`engine`, built but not loaded; `send` puts a message on the wire."""
        self.engine = engine
        self._generator = engine if isinstance(engine, Engine) else None
        self._embedder = engine if isinstance(engine, Embedder) else None
        self._wire = send
        self._chunks: list[tuple[int, TokenChunk]] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def _send(self, message: FromEngine) -> None:
        self._flush_chunks()  # what a request yielded goes before what is said about it after
        self._wire(message)

    def _send_chunk(self, sid: int, chunk: TokenChunk) -> None:
        if not self._chunks:
            asyncio.get_running_loop().call_soon(self._flush_chunks)
        self._chunks.append((sid, chunk))

    def _flush_chunks(self) -> None:
        if self._chunks:
            chunks, self._chunks = tuple(self._chunks), []
            self._wire(Chunks(chunks))

    async def run(self, inbox: asyncio.Queue[ToEngine | None]) -> None:
        try:
            info = await self.engine.load()
        except Exception as exc:
            logger.opt(exception=exc).error("the {} engine failed to load", self.engine.name)
            self._send(LoadFailed(ErrorReport("engine", f"{type(exc).__name__}: {exc}")))
            return
        if self._generator is not None:
            generator = self._generator
            self._send(Ready(info, generator.supported_params, generator.max_running))
        else:
            self._send(Ready(info))
        beating = asyncio.create_task(self._heartbeat())
        try:
            while (message := await inbox.get()) is not None and self.handle(message):
                pass
        finally:
            beating.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await self.engine.unload()

    def handle(self, message: ToEngine) -> bool:
        """Act on one message; False when it says to stop."""
        if isinstance(message, Generate):
            self._track(message.sid, self._generate(message))
        elif isinstance(message, Cancel):
            if (task := self.tasks.get(message.sid)) is not None:
                task.cancel()
        elif isinstance(message, Tokenize):
            self._track(message.sid, self._tokenize(message))
        elif isinstance(message, Embed):
            self._track(message.sid, self._embed(message))
        elif isinstance(message, Shutdown):
            return False
        return True

    def _track(self, sid: int, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks[sid] = task
        task.add_done_callback(lambda _: self.tasks.pop(sid, None))

    async def _generate(self, message: Generate) -> None:
        try:
            if self._generator is None:
                raise EngineError(f"the {self.engine.name} engine serves embeddings only")
            async with contextlib.aclosing(self._generator.generate(message.request)) as chunks:
                async for chunk in chunks:
                    self._send_chunk(message.sid, chunk)
        except Exception as exc:
            self._send(Failed(message.sid, ErrorReport.of(exc)))
        finally:
            self._send(Stats(self.engine.stats()))  # fresh figures as soon as a request ends

    async def _tokenize(self, message: Tokenize) -> None:
        try:
            ids = await self.engine.tokenize(message.text, add_special=message.add_special)
        except Exception as exc:
            self._send(Failed(message.sid, ErrorReport.of(exc)))
            return
        self._send(Tokens(message.sid, ids))

    async def _embed(self, message: Embed) -> None:
        try:
            if self._embedder is None:
                raise EngineError(f"the {self.engine.name} engine does not embed")
            vectors = await self._embedder.embed(message.inputs)
        except Exception as exc:
            self._send(Failed(message.sid, ErrorReport.of(exc)))
            return
        self._send(Vectors(message.sid, vectors))

    async def _heartbeat(self) -> None:
        while True:
            self._send(Stats(self.engine.stats()))
            await asyncio.sleep(HEARTBEAT_SECONDS)


class Outbox:
    """Frames to the server, written by one thread so the event loop never blocks on the pipe;
    whatever piled up while it wrote goes out in the next single write."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="engine-outbox", daemon=True)
        self._thread.start()

    def send(self, message: FromEngine) -> None:
        self._queue.put(encode_frame(message))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _write(self) -> None:
        while True:
            frames = [self._queue.get()]
            while not self._queue.empty():
                frames.append(self._queue.get())
            done = frames[-1] is None
            try:
                self._stream.write(b"".join(f for f in frames if f is not None))
                self._stream.flush()
            except (BrokenPipeError, OSError):
                return  # the server is gone; the reader sees EOF and shuts us down
            if done:
                return


def forward_logs(outbox: Outbox, level: str) -> None:
    """Send this process's log records (loguru and standard logging) to the server's sinks."""

    def sink(message: Any) -> None:
        record = message.record
        text = record["message"]
        if record["exception"] is not None:
            text += f" ({record['exception'].value!r})"
        outbox.send(Log(record["level"].name, text))

    logger.remove()
    logger.add(sink, level=level, format="{message}")
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)


def main(build: Callable[[Start], Engine | Embedder] = build_from_registry) -> int:
    """Read the Start message, build the engine with `build`, serve until stdin closes."""
    # The pipe closing stops an engine in order; this is for when that cannot happen (the
    # engine wedged in native code while its parent was SIGKILLed, as a Ray replica is).
    die_with_parent(os.getppid())
    # The protocol owns the real stdout; anything native code prints goes to stderr instead.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    protocol_in = sys.stdin.fileno()
    outbox = Outbox(protocol_out)
    start = read_frame(protocol_in)
    if not isinstance(start, Start):
        return 2
    forward_logs(outbox, start.log_level)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[ToEngine | None] = asyncio.Queue()

        def read() -> None:  # blocking reads on a thread of their own; EOF means stop
            with contextlib.suppress(RuntimeError):  # the loop closed first: we are stopping
                while (message := read_frame(protocol_in)) is not None:
                    loop.call_soon_threadsafe(inbox.put_nowait, message)
                loop.call_soon_threadsafe(inbox.put_nowait, None)

        threading.Thread(target=read, name="engine-inbox", daemon=True).start()
        try:
            engine = build(start)
        except Exception as exc:  # an unknown engine, a backend that will not import
            logger.opt(exception=exc).error("the {} engine could not be built", start.engine)
            outbox.send(LoadFailed(ErrorReport("engine", f"{type(exc).__name__}: {exc}")))
            return
        await EngineHost(engine, outbox.send).run(inbox)

    try:
        asyncio.run(run())
    finally:
        outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
