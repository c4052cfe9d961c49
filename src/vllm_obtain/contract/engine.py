"""The one contract every engine meets, and every embedder.

Everything crossing it is plain data (contract.data), so an engine can live in a worker process
(vllm_obtain.runtime) without either side changing. Engines know nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Literal, Protocol, runtime_checkable

from vllm_obtain.contract.data import (
    EmbeddingModelInfo,
    GenerationRequest,
    ModelInfo,
    ReplicaReport,
    TokenChunk,
)

# The sampling parameters every engine here implements (contract.data.SamplingParams).
STANDARD_SAMPLING = frozenset(
    {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "ignore_eos"}
)

# What an engine that can constrain its output to a JSON schema offers: response_format, and
# tool_choice "required" or naming a function (a call is JSON of a known shape).
CONSTRAINED_OUTPUT = frozenset({"response_format", "tool_choice"})

# A stats() counter that grows while the engine works, a long prompt's prefill included (no
# token comes out then): a supervisor counts its growth as progress, not only emitted tokens.
PROGRESS_STAT = "evaluated_tokens"

# loading: not yet served; ready: serving; restarting: recovering from a crash or a hang;
# failed: gave up after too many restarts (liveness fails, so an orchestrator replaces us).
EngineState = Literal["loading", "ready", "restarting", "failed"]


@runtime_checkable
class Engine(Protocol):
    """A loaded model that turns prompts into token streams."""

    name: str
    # The request features this engine honours (sampling params, logprobs, JSON constraints);
    # a request asking for another one is refused with a 400 naming it, never silently ignored.
    supported_params: frozenset[str]
    # How many sequences it decodes at once; more requests than this wait in its queue.
    max_running: int
    # Whether it can serve right now (in-process engines are "ready" once loaded).
    state: EngineState

    async def load(self) -> ModelInfo:
        """Load the model; return what the serving layer needs to know about it."""
        ...

    async def unload(self) -> None:
        """Stop generating and free the model."""
        ...

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of `text`; `add_special` adds the BOS token where the model wants one."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        """Stream the new tokens; the last chunk has a finish_reason.

        Closing the generator early (client gone, stop string hit) cancels the generation.
        Failures raise EngineError.
        """
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for health and metrics: at least `running` and `waiting`; where the engine
        knows them, `kv_cache_usage` (0 to 1) and PROGRESS_STAT."""
        ...


@runtime_checkable
class ReplicatedEngine(Engine, Protocol):
    """An engine that is several replicas of one model (on a cluster); its stats() are their
    sum, and each replica reports itself for health and metrics."""

    def replicas(self) -> list[ReplicaReport]:
        """Every replica known now, in a stable order."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """A loaded embedding model: token lists in, unit-length vectors out."""

    name: str
    state: EngineState

    async def load(self) -> EmbeddingModelInfo: ...

    async def unload(self) -> None: ...

    async def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The tokens of `text` as the model sees it, its special tokens included."""
        ...

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per token list (each within the model's context length)."""
        ...

    def stats(self) -> dict[str, float]: ...
