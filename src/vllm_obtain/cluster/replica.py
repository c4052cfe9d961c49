"""One replica of a model's engine deployment: the model in a supervised engine process,
exactly as the single-box server runs it (restarted after a crash or a hang), answering the
ingress through Ray Serve. Ray replaces the whole replica when it dies, or when its health
check fails because the supervisor gave up restarting the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncGenerator
from typing import Any

import ray
from loguru import logger
from ray import serve

from vllm_obtain.cluster.board import REPORT_SECONDS
from vllm_obtain.cluster.messages import ClusterModel, ReplicaDescription, ReplicaFault
from vllm_obtain.contract import (
    Engine,
    EngineConfig,
    EngineError,
    GenerationRequest,
    ReplicaReport,
    TokenChunk,
)
from vllm_obtain.hardware import detect_platform
from vllm_obtain.runtime.parent_watch import die_with_parent
from vllm_obtain.runtime.wire import ErrorReport
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import configure_logging_for, model_engine_config, model_source, named_model


def parallel_size(config: EngineConfig) -> int:
    """GPUs one copy of the model is spread over (vLLM's tensor x pipeline parallel size)."""
    args = config.vllm_args
    return int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))


def sharded_over_ray(config: EngineConfig, *, address: str, placement_group: str) -> EngineConfig:
    """The engine configuration of a model sharded over several GPUs: vLLM's own Ray
    executor, its workers in the placement group this replica was given."""
    args = {"distributed_executor_backend": "ray", **config.vllm_args}
    return dataclasses.replace(
        config, vllm_args=args, ray_address=address, ray_placement_group=placement_group
    )


def replica_engine(settings: Settings, model: ClusterModel) -> Engine:
    """The model's engine for this replica, in its supervised process, not yet loaded
    (resolving the weights may download or convert them: it runs in a thread)."""
    info = detect_platform()
    installed, _, fetch_as = named_model(model.name, settings)
    config = model_engine_config(settings, info, model.engine)
    if model.engine == "vllm" and parallel_size(config) > 1:
        group = ray.util.get_current_placement_group()
        if group is None:
            raise EngineError("a sharded model needs its replica in a placement group")
        config = sharded_over_ray(
            config,
            address=ray.get_runtime_context().gcs_address,
            placement_group=group.id.hex(),
        )
    source = model_source(
        installed, settings, info, model.engine, pinned=True, fetch_as=fetch_as, config=config
    )
    return source.build().engine


class EngineReplica:
    """A Ray Serve deployment class: one model's engine, served to the ingress."""

    # Ray actors (Serve replicas) may construct themselves asynchronously; type checkers
    # insist __init__ returns None.
    async def __init__(  # type: ignore[misc]
        self, settings: dict[str, Any], model: ClusterModel, board: Any
    ) -> None:
        self._settings = Settings(**settings)
        context = serve.get_replica_context()
        self.replica_id = str(context.replica_id.unique_id)
        self._model = model
        configure_logging_for(
            self._settings, file_name=f"vllm-obtain-{model.deployment}-{self.replica_id}.log"
        )
        self._node = ray.get_runtime_context().get_node_id()
        # A worker outlives its node's raylet for a while (seen: a minute), still reporting
        # and holding its engine, though Ray has replaced it; Ray starts workers from the
        # raylet, so its going is this process's parent going.
        die_with_parent(os.getppid(), last_words=self._lost_node)
        self._board = board
        self._requests = 0
        self.engine = await asyncio.to_thread(replica_engine, self._settings, model)
        self._info = await self.engine.load()
        self._reporting = asyncio.create_task(self._report_forever())
        logger.info(
            "replica {} of {} serves on {} (node {}, pid {})",
            self.replica_id,
            model.id,
            self.engine.name,
            self._node,
            os.getpid(),
        )

    # Every call takes `avoid`: the replicas a retried call failed on, read by the router in
    # the caller's process (cluster.router), not here.

    async def describe(self, avoid: tuple[str, ...] = ()) -> ReplicaDescription:
        """What this replica serves."""
        return ReplicaDescription(self._info, self.engine.supported_params, self.engine.max_running)

    async def tokenize(
        self, text: str, add_special: bool, avoid: tuple[str, ...] = ()
    ) -> list[int] | ReplicaFault:
        try:
            return await self.engine.tokenize(text, add_special=add_special)
        except Exception as exc:
            return self._fault(exc)

    async def generate(
        self, request: GenerationRequest, avoid: tuple[str, ...] = ()
    ) -> AsyncGenerator[TokenChunk | ReplicaFault, None]:
        """The request's token chunks; a failure is the last item, not an exception."""
        self._requests += 1
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except Exception as exc:
            yield self._fault(exc)

    def _fault(self, exc: Exception) -> ReplicaFault:
        """A failure as an answer, its kind kept; one that is not the engine's is a bug here."""
        if not isinstance(exc, EngineError):
            logger.opt(exception=exc).error("replica {} failed: {}", self.replica_id, exc)
        return ReplicaFault(ErrorReport.of(exc), self.replica_id)

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: its engine has given up."""
        if self.engine.state == "failed":
            raise RuntimeError(f"the {self.engine.name} engine of {self._model.id} gave up")

    def _lost_node(self) -> None:
        logger.critical("replica {} lost its node's raylet; exiting", self.replica_id)

    def report(self) -> ReplicaReport:
        stats = {**self.engine.stats(), "requests": self._requests, "replica_pid": os.getpid()}
        return ReplicaReport(self.replica_id, self._node, self.engine.state, stats)

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._board.report.remote(self._model.deployment, self.report())
            except Exception as exc:  # the board restarting: the next report will do
                logger.debug("reporting to the replica board failed: {}", exc)
            await asyncio.sleep(REPORT_SECONDS)

    async def __del__(self) -> None:
        """Ray Serve's graceful shutdown of this replica: the engine process goes with it."""
        replica = getattr(self, "replica_id", "?")
        logger.info("replica {} stopping", replica)
        reporting = getattr(self, "_reporting", None)
        if reporting is not None:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
            # The board may be going too (the whole application stopping): no waiting for it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._board.forget.remote(self.replica_id), timeout=1.0)
        engine = getattr(self, "engine", None)
        if engine is not None:
            await engine.unload()
        logger.info("replica {} stopped", replica)
