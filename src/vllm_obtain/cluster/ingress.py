"""The ingress deployment: our FastAPI app (keys, validation, OpenAI shapes, the Responses
store, metrics), behind Ray Serve's HTTP proxy, with each model a RemoteEngine over its
engine deployment. Light: it holds no model (but the embedding model, served here as on one
box) and reserves no CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve

from vllm_obtain.cluster.messages import ClusterModel
from vllm_obtain.cluster.remote_engine import RemoteEngine
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.served_model import ServedModel
from vllm_obtain.settings import Settings
from vllm_obtain.wiring import configure_logging_for, create_server_app, limits_from, read_template


def remote_registry(
    settings: Settings, models: Sequence[ClusterModel], engines: dict[str, Any], board: Any
) -> ModelRegistry:
    """The models the cluster serves, each on its engine deployment, pinned (Ray places and
    keeps the replicas; there is nothing to load on demand here)."""
    template = read_template(settings.chat_template)
    served = [
        ServedModel(
            id=model.id,
            engine=RemoteEngine(
                model.id,
                model.engine,
                engines[model.id],
                board,
                model.deployment,
                max_queue=settings.max_queue,
                timeout=settings.request_timeout,
            ),
            chat_template=template,
            limits=limits_from(settings),
        )
        for model in models
    ]
    return ModelRegistry(served, wait_timeout=settings.request_timeout)


@serve.ingress()
class Ingress:
    """A Ray Serve deployment class: the app, built once the replica has started."""

    def __init__(
        self,
        settings: dict[str, Any],
        models: list[ClusterModel],
        engines: dict[str, Any],
        board: Any,
    ) -> None:
        """`engines`: each model's DeploymentHandle, by model id; `board`: the ReplicaBoard's."""
        self._settings = Settings(**settings)
        self._models, self._engines, self._board = models, engines, board

    def __serve_build_asgi_app__(self) -> Any:
        replica = serve.get_replica_context().replica_id.unique_id
        configure_logging_for(self._settings, file_name=f"vllm-obtain-ingress-{replica}.log")
        registry = remote_registry(self._settings, self._models, self._engines, self._board)
        return create_server_app(self._settings, registry=registry)
