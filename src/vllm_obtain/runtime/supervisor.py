"""An engine run in a child process (runtime.child) and restarted when it crashes or hangs.

SupervisedEngine and SupervisedEmbedder meet the same contract as the engine inside, so the
serving layer cannot tell the difference, except that a segfault in native code now costs the
requests in flight (each gets a clean 503-style error) and a few seconds of restart, not the
server. This module never imports a backend: the child learns it from the Start message.

A hang is either silence (no heartbeat: the child's event loop is stuck, or the process is
stopped) or no progress (no token, no answer, and no growth of the engine's PROGRESS_STAT
counter, which a long prefill moves) for `hang_timeout` seconds while requests are in flight
(a native call that never returns). Either way the child is killed and the crash path
takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import psutil
from loguru import logger

from vllm_obtain.contract import (
    PROGRESS_STAT,
    STANDARD_SAMPLING,
    ChunkQueue,
    EmbeddingModelInfo,
    EngineError,
    EngineState,
    EngineUnavailableError,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
)
from vllm_obtain.runtime.wire import (
    Cancel,
    Chunks,
    Embed,
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
    read_frame_async,
)

CHILD_COMMAND = (sys.executable, "-m", "vllm_obtain.runtime.child")
RESTART_WINDOW_SECONDS = 600.0
MAX_RESTART_DELAY_SECONDS = 30.0
MEMORY_READ_SECONDS = 1.0


def describe_exit(returncode: int | None) -> str:
    """`-11` -> 'killed by SIGSEGV'; what an operator wants to read in the log."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def resident_bytes(pid: int) -> int:
    """The resident memory of a process and its descendants (vLLM's engine core and worker are
    processes of their own); 0 when it is gone."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


class RestartBudget:
    """At most `max_restarts` restarts within a sliding window; each one waits longer than the
    last (0, 1, 3, 7, 15, then 30 s), so a model that cannot come back does not spin."""

    def __init__(self, max_restarts: int, window: float = RESTART_WINDOW_SECONDS) -> None:
        self._max, self._window = max_restarts, window
        self._times: deque[float] = deque()

    def take(self, now: float) -> float | None:
        """Spend one restart at time `now`: the delay before it, or None when none is left."""
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()
        if len(self._times) >= self._max:
            return None
        self._times.append(now)
        return min(2.0 ** (len(self._times) - 1) - 1, MAX_RESTART_DELAY_SECONDS)

    @property
    def spent(self) -> int:
        """Restarts within the current window."""
        return len(self._times)


def hang_reason(
    *, now: float, last_heard: float, last_progress: float, busy: bool, timeout: float
) -> str | None:
    """Why a child counts as hung, or None: silent (no message at all) for `timeout` seconds,
    or busy with requests and no token for `timeout` seconds."""
    silent = now - last_heard
    if silent > timeout:
        return f"silent for {silent:.0f}s"
    stalled = now - last_progress if busy else 0.0
    if stalled > timeout:
        return f"made no progress for {stalled:.0f}s"
    return None


class EngineProcess:
    """One engine in a child process: starting, restarting and stopping it, and the messages
    of the requests in flight. SupervisedEngine and SupervisedEmbedder give it its contract."""

    def __init__(
        self,
        start: Start,
        *,
        hang_timeout: float = 120.0,
        max_restarts: int = 5,
        command: Sequence[str] = CHILD_COMMAND,
    ) -> None:
        self.name = start.engine
        # For logs and errors: which of the server's engine processes this is.
        self.label = start.engine if start.role == "generate" else f"{start.engine}-embeddings"
        # What the engine offers, known once the child has loaded the model (its Ready).
        self.supported_params: frozenset[str] = STANDARD_SAMPLING
        self.max_running = 1
        self.state: EngineState = "loading"
        self.restarts = 0
        self._start = start
        self._command = tuple(command)
        self._hang_timeout = hang_timeout
        self._budget = RestartBudget(max_restarts)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._streams: dict[int, ChunkQueue] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        # Calls judged by the no-progress rule: a tokenize is quick, while a big embedding
        # batch is legitimate work that reports nothing until it is done.
        self._watched_calls: set[int] = set()
        self._stats: dict[str, float] = {}
        self._last_heard = self._last_progress = time.monotonic()
        self._memory_read: tuple[float, int] | None = None  # (when, bytes)

    # --- lifecycle ---------------------------------------------------------------------------

    async def _launch(self) -> Ready:
        """Start the child and wait for its model; a model that cannot load fails startup."""
        ready = await self._spawn()
        self._watchdog = asyncio.create_task(self._watch())
        return ready

    async def _stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        proc = self._proc
        if self._reader is not None and (proc is None or proc.returncode is not None):
            # The child is gone and a restart is pending: it must not start one now.
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            proc = self._proc  # one the restart had already started, if any
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(EngineUnavailableError):
                self._send(Shutdown())
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

    async def _spawn(self) -> Ready:
        """Start a child, hand it the engine to build, and read until its model is loaded."""
        new_session: dict[str, Any] = (
            {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
            if sys.platform == "win32"
            # Its own session: a Ctrl-C in the terminal reaches the server, which then stops
            # the engine in order, instead of killing both at once.
            else {"start_new_session": True}
        )
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            **new_session,
        )
        self._proc = proc
        self._send(self._start)
        logger.info("{} engine process {} started", self.label, proc.pid)
        assert proc.stdout is not None
        while True:
            message: FromEngine | None = await read_frame_async(proc.stdout)
            if message is None:
                raise EngineError(
                    f"the {self.label} engine process {describe_exit(await proc.wait())} "
                    "while loading the model"
                )
            if isinstance(message, Ready):
                break
            if isinstance(message, LoadFailed):
                await proc.wait()
                raise EngineError(
                    f"the {self.label} engine could not load the model: {message.error.message}"
                )
            self._dispatch(message)
        self._last_heard = self._last_progress = time.monotonic()
        self._reader = asyncio.create_task(self._read_until_exit(proc))
        self.state = "ready"
        return message

    async def _read_until_exit(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while (message := await read_frame_async(proc.stdout)) is not None:
            self._dispatch(message)
        returncode = await proc.wait()
        if self._stopping:
            return
        reason = describe_exit(returncode)
        logger.error("{} engine process {} {}; restarting it", self.label, proc.pid, reason)
        self.state = "restarting"
        self._fail_in_flight(
            EngineUnavailableError(f"the {self.label} engine stopped ({reason}); it is restarting")
        )
        await self._restart()

    async def _restart(self) -> None:
        while not self._stopping:
            delay = self._budget.take(time.monotonic())
            if delay is None:
                self.state = "failed"
                logger.critical(
                    "{} engine restarted {} times in {:.0f} minutes; giving up",
                    self.label,
                    self._budget.spent,
                    RESTART_WINDOW_SECONDS / 60,
                )
                return
            self.restarts += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
            except EngineError as exc:
                logger.error("restarting the {} engine failed: {}", self.label, exc)
                continue
            logger.info("{} engine is back (restart {})", self.label, self.restarts)
            return

    async def _watch(self) -> None:
        period = min(1.0, self._hang_timeout / 4)
        while True:
            await asyncio.sleep(period)
            proc = self._proc
            if self.state != "ready" or proc is None or proc.returncode is not None:
                continue
            reason = hang_reason(
                now=time.monotonic(),
                last_heard=self._last_heard,
                last_progress=self._last_progress,
                busy=bool(self._streams or self._watched_calls),
                timeout=self._hang_timeout,
            )
            if reason is not None:
                logger.error("{} engine process {} {}: killing it", self.label, proc.pid, reason)
                proc.kill()  # the reader then sees it exit and restarts it

    # --- messages ----------------------------------------------------------------------------

    def _send(self, message: ToEngine) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            raise EngineUnavailableError(f"the {self.label} engine is not running")
        if proc.stdin.is_closing():
            raise EngineUnavailableError(f"the {self.label} engine is not running")
        proc.stdin.write(encode_frame(message))

    def _dispatch(self, message: FromEngine) -> None:
        self._last_heard = time.monotonic()
        if isinstance(message, Chunks):
            self._last_progress = self._last_heard
            for sid, chunk in message.items:
                if (stream := self._streams.get(sid)) is not None:
                    stream.put(chunk)
        elif isinstance(message, Stats):
            if message.values.get(PROGRESS_STAT) != self._stats.get(PROGRESS_STAT):
                self._last_progress = self._last_heard  # working: a long prefill, say
            self._stats = message.values
        elif isinstance(message, Log):
            proc = self._proc
            logger.bind(engine=self.label, engine_pid=proc.pid if proc else None).log(
                message.level, message.message
            )
        elif isinstance(message, Tokens | Vectors):
            self._last_progress = self._last_heard
            call = self._calls.get(message.sid)
            if call is not None and not call.done():
                call.set_result(message)
        elif isinstance(message, Failed):
            error = message.error.exception()
            if (stream := self._streams.get(message.sid)) is not None:
                stream.put(error)
            elif (call := self._calls.get(message.sid)) is not None and not call.done():
                call.set_exception(error)
        elif not isinstance(message, Ready | LoadFailed):
            logger.warning("{} engine process sent an unknown message: {!r}", self.label, message)

    def _fail_in_flight(self, error: EngineError) -> None:
        for stream in self._streams.values():
            stream.put(error)
        for call in self._calls.values():
            if not call.done():
                call.set_exception(error)

    def _check_ready(self) -> None:
        if self.state != "ready":
            raise EngineUnavailableError(
                f"the {self.label} engine is {self.state}; retry shortly",
                retry_after=max(1, int(self._hang_timeout)) if self.state == "failed" else 5,
            )

    async def _ask(self, message: Callable[[int], ToEngine], *, watched: bool) -> Any:
        """Send the message made for a new sid and wait for the answer with that sid; a
        `watched` call is judged by the no-progress rule, as streams are."""
        self._check_ready()
        sid = next(self._ids)
        call: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if watched:
            self._note_busy()
            self._watched_calls.add(sid)
        self._calls[sid] = call
        try:
            self._send(message(sid))
            return await call
        finally:
            del self._calls[sid]
            self._watched_calls.discard(sid)

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        self._check_ready()
        sid = next(self._ids)
        chunks = ChunkQueue()  # a reader behind the engine takes what waits as one chunk
        self._note_busy()
        self._streams[sid] = chunks
        finished = False
        try:
            self._send(Generate(sid, request))
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
                    self._send(Cancel(sid))

    def _note_busy(self) -> None:
        """A request is about to start: an idle engine has not been stalling until now."""
        if not self._streams and not self._watched_calls:
            self._last_progress = time.monotonic()

    # --- shared by both contracts -------------------------------------------------------------

    async def unload(self) -> None:
        await self._stop()

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        answer: Tokens = await self._ask(lambda sid: Tokenize(sid, text, add_special), watched=True)
        return answer.ids

    def stats(self) -> dict[str, float]:
        proc = self._proc
        running = proc is not None and proc.returncode is None
        return {
            **self._stats,
            "pid": proc.pid if proc is not None else 0,
            "restarts": self.restarts,
            "memory_bytes": self._memory(proc.pid) if proc is not None and running else 0,
        }

    def _memory(self, pid: int) -> int:
        """resident_bytes, read at most once a second: /health, /metrics, the admin API and
        the registry's keep-alive all ask, and it walks the machine's process table."""
        now = time.monotonic()
        if self._memory_read is None or now - self._memory_read[0] > MEMORY_READ_SECONDS:
            self._memory_read = (now, resident_bytes(pid))
        return self._memory_read[1]


class SupervisedEngine(EngineProcess):
    """The server's handle on a generation engine living in a child process."""

    async def load(self) -> ModelInfo:
        ready = await self._launch()
        if not isinstance(ready.info, ModelInfo):
            raise EngineError(f"the {self.label} engine process serves no generation model")
        self.supported_params, self.max_running = ready.supported_params, ready.max_running
        return ready.info

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        return self._stream(request)


class SupervisedEmbedder(EngineProcess):
    """An embedding model in a child process of its own, restarted like a generation engine."""

    async def load(self) -> EmbeddingModelInfo:
        ready = await self._launch()
        if not isinstance(ready.info, EmbeddingModelInfo):
            raise EngineError(f"the {self.label} engine process serves no embedding model")
        return ready.info

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        answer: Vectors = await self._ask(lambda sid: Embed(sid, inputs), watched=False)
        return answer.vectors
