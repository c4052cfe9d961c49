"""The wire between the server and an engine's process: typed messages in length-prefixed
pickle frames over the child's stdin and stdout. Both ends are this package at the same
version, so pickle (fast, and it carries the contract's dataclasses as they are) is safe.

An error crosses as an ErrorReport that keeps its kind, so a request refused in the child is
still a 400 at the server, an unavailable engine still a 503.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vllm_obtain.contract import (
    EmbeddingModelInfo,
    EngineConfig,
    EngineError,
    EngineRequestError,
    EngineUnavailableError,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
)

HEADER = struct.Struct(">I")

ErrorKind = Literal["request", "unavailable", "engine"]


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """An exception raised in the engine process, as the server re-raises it."""

    kind: ErrorKind
    message: str
    param: str | None = None  # kind "request": the request field at fault
    retry_after: int = 5  # kind "unavailable"

    @classmethod
    def of(cls, exc: BaseException) -> ErrorReport:
        if isinstance(exc, EngineRequestError):
            return cls("request", str(exc), param=exc.param)
        if isinstance(exc, EngineUnavailableError):
            return cls("unavailable", str(exc), retry_after=exc.retry_after)
        return cls("engine", str(exc))

    def exception(self) -> Exception:
        if self.kind == "request":
            return EngineRequestError(self.message, param=self.param or "")
        if self.kind == "unavailable":
            return EngineUnavailableError(self.message, retry_after=self.retry_after)
        return EngineError(self.message)


# --- server -> engine process ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The first message: which engine to build, on which weights, how; then load it."""

    role: Literal["generate", "embed"]
    engine: str
    model_path: Path
    config: EngineConfig = field(default_factory=EngineConfig)
    log_level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Generate:
    sid: int
    request: GenerationRequest


@dataclass(frozen=True, slots=True)
class Cancel:
    sid: int


@dataclass(frozen=True, slots=True)
class Tokenize:
    sid: int
    text: str
    add_special: bool


@dataclass(frozen=True, slots=True)
class Embed:
    sid: int
    inputs: list[list[int]]


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# --- engine process -> server ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded: what it is, and what the engine offers."""

    info: ModelInfo | EmbeddingModelInfo
    supported_params: frozenset[str] = frozenset()
    max_running: int = 1


@dataclass(frozen=True, slots=True)
class LoadFailed:
    error: ErrorReport


@dataclass(frozen=True, slots=True)
class Chunks:
    """What the requests in flight produced since the last message: one per decoding step, not
    one per token per request."""

    items: tuple[tuple[int, TokenChunk], ...]  # (sid, chunk)


@dataclass(frozen=True, slots=True)
class Failed:
    sid: int
    error: ErrorReport


@dataclass(frozen=True, slots=True)
class Tokens:
    sid: int
    ids: list[int]


@dataclass(frozen=True, slots=True)
class Vectors:
    sid: int
    vectors: list[list[float]]


@dataclass(frozen=True, slots=True)
class Stats:
    """Engine gauges: a heartbeat every second, and after each request."""

    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class Log:
    """A log record of the engine process, for the server's sinks."""

    level: str
    message: str


ToEngine = Start | Generate | Cancel | Tokenize | Embed | Shutdown
FromEngine = Ready | LoadFailed | Chunks | Failed | Tokens | Vectors | Stats | Log


def encode_frame(message: ToEngine | FromEngine) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _read_exactly(fd: int, size: int) -> bytes | None:
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


def read_frame(fd: int) -> Any:
    """The next message from a file descriptor (blocking), or None at end of stream."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    data = _read_exactly(fd, HEADER.unpack(header)[0])
    return None if data is None else pickle.loads(data)


async def read_frame_async(stream: asyncio.StreamReader) -> Any:
    """The next message from an asyncio stream, or None at end of stream."""
    try:
        header = await stream.readexactly(HEADER.size)
        data = await stream.readexactly(HEADER.unpack(header)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return pickle.loads(data)
