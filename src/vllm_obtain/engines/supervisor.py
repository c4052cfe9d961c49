"""An engine run in a child process (worker_process.py) and restarted when it crashes or hangs.

It meets the same Engine contract as the engine inside it, so the API layer cannot tell the
difference, except that a segfault in native code now costs the requests in flight (each gets a
clean 503-style error) and a few seconds of restart, not the server.

A hang is either silence (no heartbeat: the child's event loop is stuck, or the process is
stopped) or no token for `hang_timeout` seconds while requests are running (a native call that
never returns). Either way the child is killed and the crash path takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from loguru import logger

from vllm_obtain.core.requests import GenerationRequest, ModelInfo, TokenChunk
from vllm_obtain.engines.base import (
    STANDARD_SAMPLING,
    EngineError,
    EngineRequestError,
    EngineState,
    EngineUnavailableError,
)
from vllm_obtain.engines.llama_cpp_embed import EmbeddingModelInfo
from vllm_obtain.engines.worker_process import HEADER, Message, encode_frame

RESTART_WINDOW_SECONDS = 600.0


def describe_exit(returncode: int | None) -> str:
    """`-11` -> 'killed by SIGSEGV'; what an operator wants to read in the log."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


class SupervisedEngine:
    """The server's handle on an engine living in a child process."""

    def __init__(
        self,
        engine_name: str,
        model_path: Path,
        settings: Any,
        *,
        hang_timeout: float = 120.0,
        max_restarts: int = 5,
    ) -> None:
        self.name = engine_name
        self.supported_params: frozenset[str] = STANDARD_SAMPLING
        self.max_running = 1
        self.state: EngineState = "loading"
        self.restarts = 0
        self._start_message = ("start", engine_name, model_path, settings)
        self._hang_timeout = hang_timeout
        self._max_restarts = max_restarts
        self._restart_times: deque[float] = deque()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._streams: dict[int, asyncio.Queue[TokenChunk | BaseException]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._stats: dict[str, float] = {}
        self._last_heard = self._last_progress = time.monotonic()

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> ModelInfo:
        """Start the child and wait for its model; a model that cannot load fails startup."""
        info = await self._spawn()
        self._watchdog = asyncio.create_task(self._watch())
        return info

    async def unload(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(EngineUnavailableError):
                self._send(("shutdown",))
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except asyncio.TimeoutError:
                logger.warning("engine process {} did not stop; killing it", proc.pid)
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_in_flight(EngineUnavailableError("the server is shutting down"))

    async def _spawn(self) -> ModelInfo:
        """Start a child, hand it the engine to build, and read until its model is loaded."""
        new_session: dict[str, Any] = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
            if sys.platform == "win32"
            # Its own session: a Ctrl-C in the terminal reaches the server, which then stops
            # the engine in order, instead of killing both at once.
            else {"start_new_session": True}
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vllm_obtain.engines.worker_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            **new_session,
        )
        self._proc = proc
        self._send(self._start_message)
        logger.info("{} engine process {} started", self.name, proc.pid)
        while True:
            message = await self._read_message(proc)
            if message is None:
                raise EngineError(
                    f"the {self.name} engine process {describe_exit(await proc.wait())} "
                    "while loading the model"
                )
            if message[0] == "ready":
                info: ModelInfo
                _, info, self.supported_params, self.max_running = message
                break
            if message[0] == "load_failed":
                await proc.wait()
                raise EngineError(f"the {self.name} engine could not load the model: {message[1]}")
            self._dispatch(message)
        self._last_heard = self._last_progress = time.monotonic()
        self._reader = asyncio.create_task(self._read_until_exit(proc))
        self.state = "ready"
        return info

    async def _read_message(self, proc: asyncio.subprocess.Process) -> Message | None:
        assert proc.stdout is not None
        try:
            header = await proc.stdout.readexactly(HEADER.size)
            (size,) = HEADER.unpack(header)
            data = await proc.stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        message: Message = pickle.loads(data)
        return message

    async def _read_until_exit(self, proc: asyncio.subprocess.Process) -> None:
        while (message := await self._read_message(proc)) is not None:
            self._dispatch(message)
        returncode = await proc.wait()
        if self._stopping:
            return
        reason = describe_exit(returncode)
        logger.error("{} engine process {} {}; restarting it", self.name, proc.pid, reason)
        self.state = "restarting"
        self._fail_in_flight(
            EngineUnavailableError(f"the {self.name} engine stopped ({reason}); it is restarting")
        )
        await self._restart()

    async def _restart(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_SECONDS:
                self._restart_times.popleft()
            if len(self._restart_times) >= self._max_restarts:
                self.state = "failed"
                logger.critical(
                    "{} engine restarted {} times in {:.0f} minutes; giving up",
                    self.name,
                    len(self._restart_times),
                    RESTART_WINDOW_SECONDS / 60,
                )
                return
            self._restart_times.append(now)
            self.restarts += 1
            await asyncio.sleep(min(2 ** (len(self._restart_times) - 1) - 1, 30))
            try:
                await self._spawn()
            except EngineError as exc:
                logger.error("restarting the {} engine failed: {}", self.name, exc)
                continue
            logger.info("{} engine is back (restart {})", self.name, self.restarts)
            return

    async def _watch(self) -> None:
        period = min(1.0, self._hang_timeout / 4)
        while True:
            await asyncio.sleep(period)
            proc = self._proc
            if self.state != "ready" or proc is None or proc.returncode is not None:
                continue
            now = time.monotonic()
            silent = now - self._last_heard
            stalled = now - self._last_progress if self._streams else 0.0
            if max(silent, stalled) > self._hang_timeout:
                what = "silent" if silent > self._hang_timeout else "made no progress"
                logger.error(
                    "{} engine process {} {} for {:.0f}s: killing it",
                    self.name,
                    proc.pid,
                    what,
                    max(silent, stalled),
                )
                proc.kill()  # the reader then sees it exit and restarts it

    # --- messages ----------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            raise EngineUnavailableError(f"the {self.name} engine is not running")
        if proc.stdin.is_closing():
            raise EngineUnavailableError(f"the {self.name} engine is not running")
        proc.stdin.write(encode_frame(message))

    def _dispatch(self, message: Message) -> None:
        self._last_heard = time.monotonic()
        kind = message[0]
        if kind == "chunk":
            self._last_progress = self._last_heard
            stream = self._streams.get(message[1])
            if stream is not None:
                stream.put_nowait(message[2])
        elif kind == "stats":
            self._stats = message[1]
        elif kind == "log":
            proc = self._proc
            logger.bind(engine=self.name, engine_pid=proc.pid if proc else None).log(
                message[1], message[2]
            )
        elif kind in ("tokens", "vectors"):
            call = self._calls.get(message[1])
            if call is not None and not call.done():
                call.set_result(message[2])
        elif kind == "failed":
            _, _, text, param = message
            error = EngineRequestError(text, param=param) if param else EngineError(text)
            if (stream := self._streams.get(message[1])) is not None:
                stream.put_nowait(error)
            elif (call := self._calls.get(message[1])) is not None and not call.done():
                call.set_exception(error)

    def _fail_in_flight(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
        for call in self._calls.values():
            if not call.done():
                call.set_exception(error)

    def _check_ready(self) -> None:
        if self.state != "ready":
            raise EngineUnavailableError(
                f"the {self.name} engine is {self.state}; retry shortly",
                retry_after=int(self._hang_timeout) if self.state == "failed" else 5,
            )

    # --- the Engine contract -----------------------------------------------------------------

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        tokens: list[int] = await self.call("tokenize", text, add_special)
        return tokens

    async def call(self, kind: str, *args: Any) -> Any:
        """Ask the engine process one thing and wait for its answer."""
        self._check_ready()
        sid = next(self._ids)
        call: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[sid] = call
        try:
            self._send((kind, sid, *args))
            return await call
        finally:
            del self._calls[sid]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        self._check_ready()
        sid = next(self._ids)
        chunks: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        if not self._streams:
            self._last_progress = time.monotonic()  # an idle engine has not been stalling
        self._streams[sid] = chunks
        finished = False
        try:
            self._send(("generate", sid, request))
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            del self._streams[sid]
            if not finished:
                with contextlib.suppress(EngineUnavailableError):
                    self._send(("cancel", sid))

    def stats(self) -> dict[str, float]:
        proc = self._proc
        return {
            **self._stats,
            "pid": proc.pid if proc is not None else 0,
            "restarts": self.restarts,
        }


class SupervisedEmbedder:
    """An embedding model in a child process of its own, restarted like a generation engine."""

    def __init__(self, process: SupervisedEngine) -> None:
        self._process = process
        self.name = process.name

    @property
    def state(self) -> EngineState:
        return self._process.state

    def stats(self) -> dict[str, float]:
        return self._process.stats()

    async def load(self) -> EmbeddingModelInfo:
        info: Any = await self._process.load()  # what the child's embedder reported
        return cast(EmbeddingModelInfo, info)

    async def unload(self) -> None:
        await self._process.unload()

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return await self._process.tokenize(text, add_special=add_special)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors: list[list[float]] = await self._process.call("embed", inputs)
        return vectors
