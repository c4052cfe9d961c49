"""The Ray Serve application `serve --ray` runs, made from the settings: an engine
deployment per model (its replicas, their resources, autoscaling, prefix-aware routing,
health checks), the replica board, and the ingress in front.

The options are plain dicts from pure functions, so what each flag becomes is tested without
a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray import serve

from vllm_obtain.cluster.board import ReplicaBoard
from vllm_obtain.cluster.ingress import Ingress
from vllm_obtain.cluster.messages import ClusterModel
from vllm_obtain.cluster.replica import EngineReplica, parallel_size
from vllm_obtain.hardware import PlatformInfo, choose_engine
from vllm_obtain.settings import Settings, replica_range
from vllm_obtain.wiring import default_model, engine_config, named_model

APP_NAME = "vllm-obtain"
# Ray Serve replaces a replica that fails REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD (3) checks
# in a row; every 2 s (its default is 10) a replica whose engine gave up goes within ~6 s.
HEALTH_CHECK_SECONDS = 2.0
HEALTH_CHECK_TIMEOUT_SECONDS = 30.0
# HTTP requests one ingress replica takes at once; beyond, Serve's proxy queues them. Our own
# bounded queues (--max-queue per model, 429) are far below it.
INGRESS_MAX_ONGOING = 4096
# vLLM's default max_num_seqs.
VLLM_MAX_SEQS = 256
# Serve imports the router by this path wherever a handle to the engine deployment is made.
ROUTER = "vllm_obtain.cluster.router.PrefixAwareRouter"
# Our deployments' code is asyncio through and through (blocking work goes to threads), so it
# may run on Serve's own event loop, and a handle's router beside it: thread hops fewer per
# streamed token (measured with one replica: +10 % tokens/s at 1 stream, +16 % at 16).
SAME_LOOP = {
    "env_vars": {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    }
}
# The ingress and the board stay on the head node, beside Serve's proxy (HeadOnly) and
# controller: losing another node must not take them (nor leave an orphaned ingress there,
# still answering: a worker outlives its node's raylet for a while). Ray gives the head node
# this resource.
ON_THE_HEAD: dict[str, Any] = {
    "num_cpus": 0,
    "resources": {"node:__internal_head__": 0.001},
    "runtime_env": SAME_LOOP,
}


def deployment_name(model_id: str) -> str:
    """A model's engine deployment: its id in the characters Serve names allow."""
    return "engine-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model_id)


def for_replicas(settings: Settings) -> Settings:
    """The settings as replicas on other processes and nodes read them: directories made
    absolute (a Ray worker's working directory is not ours)."""
    paths = {
        name: Path(getattr(settings, name)).expanduser().resolve()
        for name in ("models_dir", "cache_dir", "logs_dir")
    }
    return settings.model_copy(update=paths)


def cluster_models(settings: Settings, info: PlatformInfo) -> list[ClusterModel]:
    """The models named at start (the default model when none is), each with its engine as
    `doctor` would choose it on this machine (the one `serve --ray` runs on)."""
    models = []
    for index, spec in enumerate(settings.model or [default_model()]):
        installed, requested, fetch_as = named_model(spec, settings)
        engine, _ = choose_engine(info, installed.format, requested)
        name = fetch_as
        if Path(fetch_as).expanduser().exists():  # a file or folder given by its path
            name = str(Path(fetch_as).expanduser().resolve())
        model_id = installed.id
        if index == 0 and settings.served_model_name:
            model_id = settings.served_model_name
        models.append(ClusterModel(model_id, name, engine, deployment_name(model_id)))
    return models


def replica_capacity(engine: str, settings: Settings) -> int:
    """Sequences one replica's engine decodes at once: Serve sends it no more, so requests
    beyond wait at the router for whichever replica frees first."""
    if engine == "llama.cpp":
        return settings.parallel
    if engine == "mlx":
        return settings.max_batch
    return int(engine_config(settings).vllm_args.get("max_num_seqs", VLLM_MAX_SEQS))


def engine_options(
    settings: Settings, model: ClusterModel, *, cluster_gpus: float
) -> dict[str, Any]:
    """serve.deployment's options for a model's engine deployment."""
    capacity = replica_capacity(model.engine, settings)
    world = parallel_size(engine_config(settings)) if model.engine == "vllm" else 1
    cpus = settings.replica_cpus or float(settings.threads or 1)
    options: dict[str, Any] = {
        "name": model.deployment,
        "max_ongoing_requests": capacity,
        # The ingress bounds the queue (--max-queue, then 429) for the whole deployment.
        "max_queued_requests": -1,
        "health_check_period_s": HEALTH_CHECK_SECONDS,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_SECONDS,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "request_router_config": {"request_router_class": ROUTER},
        "logging_config": serve_logging(settings),
    }
    if settings.autoscale is not None:
        fewest, most = replica_range(settings.autoscale)
        options["autoscaling_config"] = {
            "min_replicas": fewest,
            "initial_replicas": fewest,
            "max_replicas": most,
            # Up when replicas hold more than half their batch on average, down below.
            "target_ongoing_requests": max(1, capacity // 2),
        }
    else:
        options["num_replicas"] = settings.replicas
    if world > 1:
        # One GPU a bundle, as vLLM's Ray executor wants; the replica (vLLM's driver) sits in
        # the first, whose GPU is its rank-0 worker's. PACK keeps them on as few nodes as fit.
        options["ray_actor_options"] = {"num_cpus": cpus, "num_gpus": 0, "runtime_env": SAME_LOOP}
        options["placement_group_bundles"] = [{"CPU": cpus, "GPU": 1.0}] + [
            {"GPU": 1.0} for _ in range(world - 1)
        ]
        options["placement_group_strategy"] = "PACK"
    else:
        gpus = settings.replica_gpus
        if gpus is None:
            gpus = 1.0 if model.engine == "vllm" and cluster_gpus > 0 else 0.0
        options["ray_actor_options"] = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "runtime_env": SAME_LOOP,
        }
    return options


def ingress_options(settings: Settings) -> dict[str, Any]:
    return {
        "name": "ingress",
        "num_replicas": 1,
        "ray_actor_options": ON_THE_HEAD,
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "logging_config": serve_logging(settings),
    }


# loguru's levels that the standard logging Serve uses does not have.
SERVE_LEVELS = {"TRACE": "DEBUG", "SUCCESS": "INFO"}


def serve_logging(settings: Settings) -> dict[str, Any]:
    """Ray Serve's own log lines (its controller, proxy and replica files): JSON in prod, as
    ours are; no access log, as the ingress writes one line per request."""
    level = settings.effective_log_level
    return {
        "encoding": "JSON" if settings.mode == "prod" else "TEXT",
        "log_level": SERVE_LEVELS.get(level, level),
        "enable_access_log": False,
    }


def build_application(
    settings: Settings, models: list[ClusterModel], *, cluster_gpus: float
) -> Any:
    """The bound application: the ingress, given every engine deployment and the board."""
    shipped = for_replicas(settings).model_dump(mode="json")
    board = serve.deployment(
        name="board",
        num_replicas=1,
        ray_actor_options=ON_THE_HEAD,
        logging_config=serve_logging(settings),
    )(ReplicaBoard).bind()
    engines = {
        model.id: serve.deployment(**engine_options(settings, model, cluster_gpus=cluster_gpus))(
            EngineReplica
        ).bind(shipped, model, board)
        for model in models
    }
    ingress = serve.deployment(**ingress_options(settings))(Ingress)
    return ingress.bind(shipped, models, engines, board)
