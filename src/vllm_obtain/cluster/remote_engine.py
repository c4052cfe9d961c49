"""A model served by the replicas of a Ray Serve deployment, as one engine: contract.Engine
over a streaming DeploymentHandle, so the ingress's registry, planning and response shaping
use it as they use a local engine, and nothing above it changes.

A request that has not streamed anything yet is retried on another replica when its replica
is lost (Ray's errors) or its engine is down there (ReplicaFault, unavailable); a stream that
had started ends with EngineUnavailableError, which the client sees as an error event. What
each replica reports (cluster.board) gives the deployment's state and gauges.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from loguru import logger
from ray.exceptions import RayError
from ray.serve.exceptions import (
    BackPressureError,
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
from vllm_obtain.core.served_model import QueueFullError

# Seconds before each retry of a request whose replica failed it; one attempt more than delays.
RETRY_DELAYS = (0.0, 0.5, 1.0)
BOARD_READ_SECONDS = 1.0
# Ray's errors that mean the replica is lost or unreachable, not that the request is wrong.
REPLICA_LOST = (RayError, DeploymentUnavailableError, ReplicaUnavailableError)


class RemoteEngine:
    """The replicas of one engine deployment, seen from the ingress as one engine."""

    def __init__(self, model_id: str, engine: str, handle: Any, board: Any, deployment: str):
        """`handle`: the engine deployment's DeploymentHandle; `board`: the ReplicaBoard's."""
        self.model_id = model_id
        self.name = engine
        self.supported_params: frozenset[str] = STANDARD_SAMPLING
        self.max_running = 1
        self.state: EngineState = "loading"
        self._handle = handle
        self._streams = handle.options(stream=True)
        self._board = board
        self._deployment = deployment
        self._per_replica = 1
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
        ids: list[int] = await self._call("tokenize", text, add_special)
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenChunk, None]:
        avoid: tuple[str, ...] = ()
        for attempt, delay in enumerate(RETRY_DELAYS, start=1):
            if delay:
                await asyncio.sleep(delay)
            last = attempt == len(RETRY_DELAYS)
            streamed = finished = False
            stream = self._streams.generate.remote(request, **{AVOID_KWARG: avoid})
            try:
                async for item in stream:
                    if isinstance(item, ReplicaFault):
                        finished = True
                        if streamed or last or not item.retryable:
                            raise item.error.exception()
                        logger.warning("{}; retrying elsewhere", item.error.message)
                        avoid += (item.replica_id,)
                        break
                    streamed = True
                    finished = item.finish_reason is not None
                    yield item
                    if finished:
                        return
                else:
                    finished = True
                    raise EngineError("the replica ended the stream before the answer did")
            except BackPressureError as exc:
                raise QueueFullError(self.model_id) from exc
            except RequestCancelledError:
                raise
            except REPLICA_LOST as exc:
                if streamed or last:
                    raise EngineUnavailableError(
                        f"the replica serving '{self.model_id}' was lost: {_short(exc)}"
                    ) from exc
                logger.warning("a replica of {} was lost ({}); retrying", self.model_id, exc)
            finally:
                if not finished:  # the client left, or the replica is lost: stop it there
                    stream.cancel()

    async def _call(self, method: str, *args: Any) -> Any:
        """A plain call to one replica, retried on another while its replica fails."""
        avoid: tuple[str, ...] = ()
        for attempt, delay in enumerate(RETRY_DELAYS, start=1):
            if delay:
                await asyncio.sleep(delay)
            last = attempt == len(RETRY_DELAYS)
            try:
                answer = await getattr(self._handle, method).remote(*args, **{AVOID_KWARG: avoid})
            except BackPressureError as exc:
                raise QueueFullError(self.model_id) from exc
            except RequestCancelledError:
                raise
            except REPLICA_LOST as exc:
                if last:
                    raise EngineUnavailableError(
                        f"no replica of '{self.model_id}' answered: {_short(exc)}"
                    ) from exc
                continue
            if not isinstance(answer, ReplicaFault):
                return answer
            if last or not answer.retryable:
                raise answer.error.exception()
            avoid += (answer.replica_id,)
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, float]:
        """The replicas' gauges summed (their KV cache use averaged), and how many serve."""
        reports = self._reports
        total: dict[str, float] = {"running": 0.0, "waiting": 0.0}
        for name in ("running", "waiting", "restarts", "memory_bytes", "requests"):
            total[name] = float(sum(r.stats.get(name, 0) for r in reports))
        usage = [r.stats["kv_cache_usage"] for r in reports if "kv_cache_usage" in r.stats]
        if usage:
            total["kv_cache_usage"] = sum(usage) / len(usage)
        total["replicas"] = float(sum(r.state == "ready" for r in reports))
        return total

    def replicas(self) -> list[ReplicaReport]:
        return list(self._reports)

    async def _follow_board(self) -> None:
        while True:
            try:
                self.take_reports(await self._board.reports.remote(self._deployment))
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


def _short(exc: BaseException) -> str:
    """Ray's errors carry tracebacks; the first line says what happened."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
