"""The one contract every engine meets.

Everything crossing it is plain data (core.requests), so an engine can later live in a worker
process without either side changing. Engines know nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, runtime_checkable

from vllm_obtain.core.requests import GenerationRequest, ModelInfo, TokenChunk

# The sampling parameters every engine here implements (core.requests.SamplingParams).
STANDARD_SAMPLING = frozenset(
    {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "ignore_eos"}
)


# What an engine that can constrain its output to a JSON schema offers: response_format, and
# tool_choice "required" or naming a function (a call is JSON of a known shape).
CONSTRAINED_OUTPUT = frozenset({"response_format", "tool_choice"})


class EngineError(RuntimeError):
    """The engine failed while serving a request; the request gets a 500, the server lives on."""


class EngineRequestError(EngineError):
    """The engine cannot do what this request asks (say, a JSON schema its grammar compiler
    refuses): the request gets a 400 naming `param`; nothing else is affected."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailableError(EngineError):
    """The engine cannot serve right now (restarting after a fault): retry shortly, 503."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# loading: not yet served; ready: serving; restarting: recovering from a crash or a hang;
# failed: gave up after too many restarts (liveness fails, so an orchestrator replaces us).
EngineState = Literal["loading", "ready", "restarting", "failed"]


class EngineNotInstalledError(RuntimeError):
    """The engine's package is missing; the message says how to install it."""


@runtime_checkable
class Engine(Protocol):
    """A loaded model that turns prompts into token streams."""

    name: str
    # The sampling parameters this engine honours; a request setting another one is refused
    # with a 400 naming it, never silently ignored.
    supported_params: frozenset[str]
    # How many sequences it decodes at once; more requests than this wait in its queue.
    max_running: int
    # Whether it can serve right now (in-process engines are "ready" once loaded).
    state: EngineState

    async def load(self) -> ModelInfo:
        """Load the model; return what the API layer needs to know about it."""
        ...

    async def unload(self) -> None:
        """Stop generating and free the model."""
        ...

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of `text`; `add_special` adds the BOS token where the model wants one."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the new tokens; the last chunk has a finish_reason.

        Closing the iterator early (client gone, stop string hit) cancels the generation.
        Failures raise EngineError.
        """
        ...

    def stats(self) -> dict[str, float]:
        """Gauges for health and metrics: at least `running` and `waiting`; where the engine
        knows it, `kv_cache_usage` (0 to 1)."""
        ...
