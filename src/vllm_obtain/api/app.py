"""The ASGI app: routes, error handlers, and the models' load/unload around the server's life."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from vllm_obtain import __version__
from vllm_obtain.api import (
    admin,
    chat,
    completions,
    embeddings,
    health,
    metrics,
    models,
    responses,
    ui,
)
from vllm_obtain.api.access import ApiKeyMiddleware, BodyLimitMiddleware
from vllm_obtain.api.admin import ModelPuller, SystemReport
from vllm_obtain.api.errors import install_error_handlers
from vllm_obtain.api.metrics import ServerMetrics
from vllm_obtain.api.middleware import JsonBodyMiddleware, RequestContextMiddleware
from vllm_obtain.core.embeddings import EmbeddingModels
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.response_store import ResponseStore


@dataclass(frozen=True)
class ApiConfig:
    """What the HTTP layer is configured by (wiring.api_config makes it from the settings)."""

    api_keys: tuple[str, ...]
    auth_health: bool  # whether /health* needs a key too
    auth_metrics: bool  # whether /metrics needs a key too
    cors_origins: tuple[str, ...]
    max_body_bytes: int
    log_prompts: bool
    # Whether responses get our X-Request-ID header: not behind Ray Serve's proxy, which sets
    # it itself (from the request's, as we would).
    request_id_header: bool = True
    ui: bool = True  # the web playground and dashboard at /


def create_app(
    config: ApiConfig,
    registry: ModelRegistry,
    *,
    embedding_models: EmbeddingModels | None = None,
    response_store: ResponseStore | None = None,
    on_load_failure: Callable[[], None] | None = None,
    model_puller: ModelPuller | None = None,
    system_report: SystemReport | None = None,
) -> FastAPI:
    """The app serving `registry`'s models (vllm_obtain.wiring builds them from the settings;
    tests pass their own). Models load in the background once it starts, so health checks can
    see "loading" meanwhile; a model that fails to load calls `on_load_failure` (the CLI
    exits)."""
    embedding_models = embedding_models or EmbeddingModels()

    async def load() -> None:
        # Embedding models load beside the chat models; one that fails only disables itself.
        embeddings = asyncio.create_task(embedding_models.load_all())
        try:
            await registry.load_all()
        except Exception:  # logged by the registry; health now says which model failed
            if on_load_failure is not None:
                on_load_failure()
        await embeddings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await registry.unload_all()
            await embedding_models.unload_all()

    app = FastAPI(title="vllm-obtain", version=__version__, lifespan=lifespan)
    app.state.registry = registry
    app.state.embedding_models = embedding_models
    app.state.config = config
    app.state.response_store = response_store  # None: /v1/responses stores nothing
    app.state.model_puller = model_puller  # None: POST /admin/pull refuses
    app.state.system_report = system_report  # None: GET /admin/system has nothing to say
    app.state.metrics = ServerMetrics(registry)
    install_error_handlers(app)
    # Added innermost first: a request meets the request context (id, log line, metrics), then
    # CORS (so browsers' preflights are answered without a key), then keys, then the body
    # limit, then the body is taken as JSON.
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.api_keys:
        app.add_middleware(
            ApiKeyMiddleware,
            keys=config.api_keys,
            auth_health=config.auth_health,
            auth_metrics=config.auth_metrics,
        )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app.state.metrics,
        log_prompts=config.log_prompts,
        request_id_header=config.request_id_header,
    )
    for module in (chat, completions, responses, embeddings, models, admin, health, metrics, ui):
        app.include_router(module.router)
    if config.ui:
        ui.mount_assets(app)
    return app
