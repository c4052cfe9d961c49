"""The engine's own process: it runs one engine and talks to the server over stdin and stdout.

A fault in native code (a segfault in llama.cpp, a GPU driver abort) then kills this process,
not the HTTP server: the supervisor (supervisor.py) sees it exit, fails the requests it had in
flight, and starts a new one. Run as `python -m vllm_obtain.engines.worker_process`.

Messages are tuples, pickled into length-prefixed frames; both ends are this package.

    server -> engine: ("start", engine_name, model_path, settings), ("generate", sid, request),
                      ("cancel", sid), ("tokenize", sid, text, add_special),
                      ("embed", sid, token_lists), ("shutdown",)
    engine -> server: ("ready", info, supported_params, max_running), ("load_failed", message),
                      ("chunk", sid, chunk), ("failed", sid, message, param), ("tokens", sid, ids),
                      ("vectors", sid, vectors), ("stats", stats), ("log", level, message)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from loguru import logger

Message = tuple[Any, ...]
HEADER = struct.Struct(">I")
HEARTBEAT_SECONDS = 1.0


def encode_frame(message: Message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def read_exactly(fd: int, size: int) -> bytes | None:
    # Unbuffered reads on the raw descriptor: a thread blocked here holds no interpreter lock
    # (a buffered stdin's lock makes interpreter shutdown abort).
    parts, missing = [], size
    while missing:
        part = os.read(fd, missing)
        if not part:
            return None
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def read_frame(fd: int) -> Message | None:
    """The next message, or None at end of stream (the server went away)."""
    header = read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    data = read_exactly(fd, size)
    if data is None:
        return None
    message: Message = pickle.loads(data)
    return message


class Outbox:
    """Frames to the server, written by one thread so the event loop never blocks on the pipe;
    whatever piled up while it wrote goes out in the next single write."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="engine-outbox", daemon=True)
        self._thread.start()

    def send(self, message: Message) -> None:
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
    from vllm_obtain.logs import InterceptHandler

    def sink(message: Any) -> None:
        record = message.record
        text = record["message"]
        if record["exception"] is not None:
            text += f" ({record['exception'].value!r})"
        outbox.send(("log", record["level"].name, text))

    logger.remove()
    logger.add(sink, level=level, format="{message}")
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)


async def serve(
    engine: Any, inbox: asyncio.Queue[Message | None], send: Callable[..., None]
) -> None:
    """Load the engine, then answer messages until told to stop or the server goes away."""
    try:
        info = await engine.load()
    except Exception as exc:
        logger.opt(exception=exc).error("the {} engine failed to load", engine.name)
        send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", info, engine.supported_params, engine.max_running))
    tasks: dict[int, asyncio.Task[None]] = {}

    async def stream(sid: int, request: Any) -> None:
        try:
            async with contextlib.aclosing(engine.generate(request)) as chunks:
                async for chunk in chunks:
                    send(("chunk", sid, chunk))
        except Exception as exc:
            send(("failed", sid, str(exc), getattr(exc, "param", None)))
        finally:
            tasks.pop(sid, None)
            send(("stats", engine.stats()))  # fresh figures as soon as a request ends

    async def tokenize(sid: int, text: str, add_special: bool) -> None:
        try:
            send(("tokens", sid, await engine.tokenize(text, add_special=add_special)))
        except Exception as exc:
            send(("failed", sid, str(exc), None))

    async def embed(sid: int, inputs: list[list[int]]) -> None:
        try:
            send(("vectors", sid, await engine.embed(inputs)))
        except Exception as exc:
            send(("failed", sid, str(exc), None))
        finally:
            tasks.pop(sid, None)

    async def heartbeat() -> None:
        while True:
            send(("stats", engine.stats()))
            await asyncio.sleep(HEARTBEAT_SECONDS)

    beating = asyncio.create_task(heartbeat())
    try:
        while (message := await inbox.get()) is not None:
            kind, sid = message[0], message[1] if len(message) > 1 else -1
            if kind == "generate":
                tasks[sid] = asyncio.create_task(stream(sid, message[2]))
            elif kind == "cancel" and sid in tasks:
                tasks[sid].cancel()
            elif kind == "tokenize":
                tasks[sid] = asyncio.create_task(tokenize(sid, message[2], message[3]))
            elif kind == "embed":
                tasks[sid] = asyncio.create_task(embed(sid, message[2]))
            elif kind == "shutdown":
                break
    finally:
        beating.cancel()
        for task in list(tasks.values()):
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await engine.unload()


def main() -> int:
    # The protocol owns the real stdout; anything native code prints goes to stderr instead.
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    protocol_in = sys.stdin.fileno()
    outbox = Outbox(protocol_out)
    start = read_frame(protocol_in)
    if start is None or start[0] != "start":
        return 2
    _, engine_name, model_path, settings = start
    forward_logs(outbox, settings.effective_log_level)

    from vllm_obtain.serving import create_any_engine

    async def run() -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Message | None] = asyncio.Queue()

        def read() -> None:  # blocking reads on a thread of their own; EOF means stop
            while (message := read_frame(protocol_in)) is not None:
                loop.call_soon_threadsafe(inbox.put_nowait, message)
            loop.call_soon_threadsafe(inbox.put_nowait, None)

        threading.Thread(target=read, name="engine-inbox", daemon=True).start()
        await serve(create_any_engine(engine_name, model_path, settings), inbox, outbox.send)

    try:
        asyncio.run(run())
    finally:
        outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
