"""A model served by the replicas of a Ray Serve deployment, as one engine: contract.Engine
over a streaming DeploymentHandle, so the ingress's registry, planning and response shaping
use it as they use a local engine, and nothing above it changes.

A request that has not streamed anything yet is tried once more, on another replica, when its
replica is lost (Ray's errors) or its engine is down there (ReplicaFault, unavailable); a
stream that had started ends with EngineUnavailableError, which the client sees as an error
event. Only once: a request that itself crashes engines (a prompt that trips a bug in native
code) must not take down every replica in turn. What each replica reports (cluster.board)
gives the deployment's state and gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from loguru import logger
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import (
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from vllm_obtain.cluster.messages import ReplicaDescription, ReplicaFault
from vllm_obtain.cluster.router import AVOID_KWARG
from vllm_obtain.contract import (
    STANDARD_SAMPLING,
    EngineError,
    EngineState,
    EngineUnavailableError,
    GenerationRequest,
    ModelInfo,
    ReplicaReport,
    TokenChunk,
)
from vllm_obtain.core.generation import GenerationTimeoutError
from vllm_obtain.core.served_model import QueueFullError

T = TypeVar("T")
# Seconds before each attempt: a first one, then one retry elsewhere.
ATTEMPT_DELAYS = (0.0, 0.5)
BOARD_READ_SECONDS = 1.0
BOARD_READ_TIMEOUT_SECONDS = 3.0
# Ray's errors that mean the replica is lost or unreachable, not that the request is wrong
# (an exception raised in the replica's own code comes as RayTaskError: a 500, not retried).
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)


class _TryElsewhere(Exception):
    """An attempt failed before anything streamed; `replica_id`: where, when it is known."""

    def __init__(self, reason: str, replica_id: str | None = None) -> None:
        super().__init__(reason)
        self.replica_id = replica_id


class RemoteEngine:
    """The replicas of one engine deployment, seen from the ingress as one engine."""

    def __init__(
        self,
        model_id: str,
        engine: str,
        handle: Any,
        board: Any,
        deployment: str,
        *,
        max_queue: int = 256,
        timeout: float = 600.0,
    ) -> None:
        """`handle`: the engine deployment's DeploymentHandle; `board`: the ReplicaBoard's;
        `max_queue` and `timeout`: the model's --max-queue and --request-timeout, which a
        request waiting for a replica to tokenize it is held to as well."""
        self.model_id = model_id
        self.name = engine
        self.supported_params: frozenset[str] = STANDARD_SAMPLING
        self.max_running = 1
        self.state: EngineState = "loading"
        self._handle = handle
        self._streams = handle.options(stream=True)
        self._board = board
        self._deployment = deployment
        self._max_queue, self._timeout = max_queue, timeout
        self._per_replica = 1
        self._in_hand = 0  # requests and sequences sent to the replicas, not yet answered
        self._reports: list[ReplicaReport] = []
        self._following: asyncio.Task[None] | None = None

    async def load(self) -> ModelInfo:
        """What the replicas serve (asked of one of them, waiting for the first to be up)."""
        description: ReplicaDescription = await self._call("describe")
        self.supported_params = description.supported_params
        self._per_replica = self.max_running = description.max_running
        self.state = "ready"
        if self._following is None:
            self._following = asyncio.create_task(self._follow_board())
        return description.info

    async def unload(self) -> None:
        """Stop following the replicas; they themselves live as long as the deployment."""
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)
            self._following = None
        self.state = "loading"

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """A new request's first call. Replicas take tokenizing from the same places as
        generating, so this is where the deployment's bound holds: its replicas' batches and
        --max-queue taken, the request is refused (429); waiting, it is held to the timeout."""
        if self._in_hand >= self.max_running + self._max_queue:
            raise QueueFullError(self.model_id)
        with self._held():
            ids: list[int] = await _within(self._call("tokenize", text, add_special), self._timeout)
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        with self._held():
            avoid: tuple[str, ...] = ()
            for attempt, delay in enumerate(ATTEMPT_DELAYS, start=1):
                await asyncio.sleep(delay)
                try:
                    async for chunk in self._attempt(request, avoid):
                        yield chunk
                    return
                except _TryElsewhere as failed:
                    if attempt == len(ATTEMPT_DELAYS):
                        raise EngineUnavailableError(f"'{self.model_id}': {failed}") from failed
                    logger.warning("{}; trying another replica", failed)
                    avoid += (failed.replica_id,) if failed.replica_id else ()

    async def _attempt(
        self, request: GenerationRequest, avoid: tuple[str, ...]
    ) -> AsyncGenerator[TokenChunk, None]:
        """One replica's stream. Before its first chunk, a lost replica or an engine down
        there is _TryElsewhere; after it, the end of the answer (EngineUnavailableError)."""
        stream = self._streams.generate.remote(request, **{AVOID_KWARG: avoid})
        streamed = finished = False
        try:
            async for item in stream:
                if isinstance(item, ReplicaFault):
                    finished = True
                    if item.retryable and not streamed:
                        raise _TryElsewhere(item.error.message, item.replica_id)
                    raise item.error.exception()
                streamed, finished = True, item.finish_reason is not None
                yield item
                if finished:
                    return
            finished = True
            raise EngineError("the replica ended the stream before the answer did")
        except REPLICA_LOST as exc:
            if not streamed:
                raise _TryElsewhere(f"a replica was lost: {_short(exc)}") from exc
            raise EngineUnavailableError(
                f"the replica serving '{self.model_id}' was lost: {_short(exc)}"
            ) from exc
        except RequestCancelledError as exc:  # Serve's own cancel, not ours (we stop reading)
            raise EngineUnavailableError(f"the replica cancelled the request: {exc}") from exc
        except RayError as exc:  # the replica's own code raised: a failure, not a lost replica
            raise EngineError(f"the replica failed: {_short(exc)}") from exc
        finally:
            if not finished:  # the client left, or the replica is lost: stop it there
                stream.cancel()

    async def _call(self, method: str, *args: Any) -> Any:
        """A plain call to one replica, tried once more elsewhere while its replica fails."""
        avoid: tuple[str, ...] = ()
        for attempt, delay in enumerate(ATTEMPT_DELAYS, start=1):
            await asyncio.sleep(delay)
            last = attempt == len(ATTEMPT_DELAYS)
            try:
                answer = await getattr(self._handle, method).remote(*args, **{AVOID_KWARG: avoid})
            except REPLICA_LOST as exc:
                if last:
                    raise EngineUnavailableError(
                        f"no replica of '{self.model_id}' answered: {_short(exc)}"
                    ) from exc
                continue
            except RayError as exc:
                raise EngineError(f"the replica failed: {_short(exc)}") from exc
            if not isinstance(answer, ReplicaFault):
                return answer
            if last or not answer.retryable:
                raise answer.error.exception()
            avoid += (answer.replica_id,)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        self._in_hand += 1
        try:
            yield
        finally:
            self._in_hand -= 1

    def stats(self) -> dict[str, float]:
        """The replicas' gauges summed (their KV cache use averaged), and how many serve."""
        reports = self._reports
        total: dict[str, float] = {"running": 0.0, "waiting": 0.0}
        for name in ("running", "waiting", "restarts", "memory_bytes", "requests"):
            total[name] = float(sum(r.stats.get(name, 0) for r in reports))
        usage = [r.stats["kv_cache_usage"] for r in reports if "kv_cache_usage" in r.stats]
        if usage:
            total["kv_cache_usage"] = sum(usage) / len(usage)
        total["ready_replicas"] = float(sum(r.state == "ready" for r in reports))
        return total

    def replicas(self) -> list[ReplicaReport]:
        return list(self._reports)

    async def _follow_board(self) -> None:
        while True:
            try:
                reports = self._board.reports.remote(self._deployment)
                self.take_reports(await _within(reports, BOARD_READ_TIMEOUT_SECONDS))
            except Exception as exc:  # the board restarting: keep the last reports
                logger.debug("reading the replica board failed: {}", exc)
            await asyncio.sleep(BOARD_READ_SECONDS)

    def take_reports(self, reports: Sequence[ReplicaReport]) -> None:
        """What the replicas said of themselves: the deployment serves while any is ready,
        and takes as many sequences at once as its ready replicas do."""
        self._reports = sorted(reports, key=lambda r: r.replica_id)
        ready = sum(r.state == "ready" for r in self._reports)
        self.max_running = self._per_replica * max(1, ready)
        if self._reports:
            self.state = "ready" if ready else "restarting"


async def _within(work: Awaitable[T], seconds: float) -> T:
    """`work`'s result, or GenerationTimeoutError after `seconds` (the work is cancelled).
    Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not done:
        raise GenerationTimeoutError(
            f"The request did not finish within the server's timeout ({seconds:g}s)."
        )
    return task.result()


def _short(exc: BaseException) -> str:
    """Ray's errors carry tracebacks; the first line says what happened."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
