"""An engine process for the supervisor's tests: runtime.child's own main loop around a scripted
engine that misbehaves on purpose. Start.engine names the behaviour:

  scripted      answers normally (ScriptedEngine)
  slow          answers normally, slowly: the first token after PREFILL_SECONDS, the rest
                every 0.05 s
  refuses       refuses every request with EngineRequestError(param="response_format")
  blocks-loop   on the prompt (HANG_TOKEN,): one token, then time.sleep() on the event loop,
                so no heartbeat leaves the process (silent)
  stalls        on the prompt (HANG_TOKEN,): one token, then awaits forever while heartbeats
                keep coming (busy, no progress)
  prefills      every request: no token for LONG_PREFILL_SECONDS while its PROGRESS_STAT
                counter grows (a long prompt read in chunks), then the reply
  crashes       every request ends the process (os._exit(CRASH_EXIT_CODE)) before a token
  fails-to-load load() raises RuntimeError(LOAD_ERROR)
  (role embed)  an embedder: tokenize("stuck") never returns (a native call stuck on a
                thread) while heartbeats keep coming; embed() takes EMBED_SECONDS, as a big
                batch does, and reports nothing until it is done

Run as `python tests/fake_engine_process.py`; the repository root is put on sys.path so that
`tests.scripted_engine` imports.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.scripted_engine import ScriptedEngine
from vllm_obtain.contract import (
    PROGRESS_STAT,
    EmbeddingModelInfo,
    EngineRequestError,
    EngineState,
    GenerationRequest,
    ModelInfo,
    TokenChunk,
)
from vllm_obtain.runtime import child
from vllm_obtain.runtime.wire import Start

HANG_TOKEN = 7
CRASH_EXIT_CODE = 3
LOAD_ERROR = "weights are corrupt"
REFUSAL = EngineRequestError(
    "the grammar cannot enforce 'patternProperties'", param="response_format"
)
# Heartbeats well inside the tests' one-second hang timeout (the real period is one second, the
# real timeout minutes), so a healthy child is never taken for a silent one.
HEARTBEAT_SECONDS = 0.1
PREFILL_SECONDS = 0.5
LONG_PREFILL_SECONDS = 3.5
EMBED_SECONDS = 2.5


class Slow(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(delay=0.05)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        await asyncio.sleep(PREFILL_SECONDS)
        async for chunk in super().generate(request):
            yield chunk


class Prefills(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.evaluated = 0

    def stats(self) -> dict[str, float]:
        return {**super().stats(), PROGRESS_STAT: self.evaluated}

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        for _ in range(int(LONG_PREFILL_SECONDS / 0.1)):
            await asyncio.sleep(0.1)
            self.evaluated += 512
        async for chunk in super().generate(request):
            yield chunk


class Refuses(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(refuse=REFUSAL)


class HangsOnCue(ScriptedEngine):
    """Answers as ScriptedEngine does, except the prompt (HANG_TOKEN,): one token, then hang()."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        if request.prompt_tokens != (HANG_TOKEN,):
            async for chunk in super().generate(request):
                yield chunk
            return
        yield TokenChunk((ord("H"),), b"H")
        await self.hang()

    async def hang(self) -> None:
        raise NotImplementedError


class BlocksLoop(HangsOnCue):
    async def hang(self) -> None:
        # One turn of the event loop sends the token (the host batches a turn's chunks); then
        # the loop blocks, and the token is the last message the server hears.
        await asyncio.sleep(0.05)
        time.sleep(60)


class Stalls(HangsOnCue):
    async def hang(self) -> None:
        await asyncio.Event().wait()


class Crashes(ScriptedEngine):
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        os._exit(CRASH_EXIT_CODE)
        yield TokenChunk((), b"")  # unreachable; makes this an async generator


class FailsToLoad(ScriptedEngine):
    async def load(self) -> ModelInfo:
        raise RuntimeError(LOAD_ERROR)


class SlowEmbedder:
    name = "embedder"
    state: EngineState = "ready"

    async def load(self) -> EmbeddingModelInfo:
        return EmbeddingModelInfo(dimensions=4, context_length=16, vocab_size=100)

    async def unload(self) -> None:
        return None

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        if text == "stuck":
            await asyncio.Event().wait()
        return [1]

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        await asyncio.sleep(EMBED_SECONDS)
        return [[1.0, 0.0, 0.0, 0.0] for _ in inputs]

    def stats(self) -> dict[str, float]:
        return {"running": 1, "waiting": 0}


def build(start: Start) -> ScriptedEngine | SlowEmbedder:
    if start.role == "embed":
        return SlowEmbedder()
    engines: dict[str, type[ScriptedEngine]] = {
        "scripted": ScriptedEngine,
        "slow": Slow,
        "prefills": Prefills,
        "refuses": Refuses,
        "blocks-loop": BlocksLoop,
        "stalls": Stalls,
        "crashes": Crashes,
        "fails-to-load": FailsToLoad,
    }
    engine = engines[start.engine]()
    engine.name = start.engine
    return engine


if __name__ == "__main__":
    child.HEARTBEAT_SECONDS = HEARTBEAT_SECONDS
    sys.exit(child.main(build=build))
