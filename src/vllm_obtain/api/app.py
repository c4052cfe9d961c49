"""The ASGI app: routes, error handlers, and the models' load/unload around the server's life."""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
from vllm_obtain.api.access import AccessMiddleware, BodyLimitMiddleware
from vllm_obtain.api.admin import ModelPuller, SystemReport
from vllm_obtain.api.browser_guard import CrossSiteMiddleware, HostCheckMiddleware
from vllm_obtain.api.errors import install_error_handlers
from vllm_obtain.api.keys import Keyring
from vllm_obtain.api.metrics import ServerMetrics
from vllm_obtain.api.middleware import RequestContextMiddleware
from vllm_obtain.api.rate_limits import (
    RATE_LIMIT_HEADERS,
    Rate,
    RateLimiter,
    RateLimitMiddleware,
)
from vllm_obtain.core.embeddings import EmbeddingModels
from vllm_obtain.core.registry import ModelRegistry
from vllm_obtain.core.response_store import ResponseStore


@dataclass(frozen=True)
class ApiConfig:
    """What the HTTP layer is configured by (wiring.api_config makes it from the settings)."""

    keyring: Keyring
    auth_health: bool  # whether /health* needs a key too
    auth_metrics: bool  # whether /metrics needs an admin key too
    cors_origins: tuple[str, ...]
    max_body_bytes: int
    log_prompts: bool
    allowed_hosts: tuple[str, ...] = ()  # besides IPs, private names and the machine's own
    rate_limit_requests: Rate | None = None
    rate_limit_tokens: Rate | None = None
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
        reloading_keys = reload_keys_on_sighup(config.keyring)
        try:
            yield
        finally:
            reloading_keys()
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
    # Added innermost first: a request meets the request context (id, log line, metrics),
    # then the Host check, then CORS (so browsers' preflights are answered without a key),
    # then the cross-site guard, then keys, then rate limits, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    if config.rate_limit_requests or config.rate_limit_tokens:
        limiter = RateLimiter(requests=config.rate_limit_requests, tokens=config.rate_limit_tokens)
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    app.add_middleware(
        AccessMiddleware,
        keyring=config.keyring,
        auth_health=config.auth_health,
        auth_metrics=config.auth_metrics,
    )
    app.add_middleware(CrossSiteMiddleware, cors_origins=config.cors_origins)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After", *RATE_LIMIT_HEADERS],
        )
    app.add_middleware(HostCheckMiddleware, allowed=config.allowed_hosts)
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


def reload_keys_on_sighup(keyring: Keyring) -> Callable[[], None]:
    """Re-read the keys file on SIGHUP, as daemons reload their configuration; returns what
    stops it. Nothing where there is no keys file, no SIGHUP (Windows) or no main thread
    (an app inside Ray Serve's replica)."""
    if keyring.keys_file is None or not hasattr(signal, "SIGHUP"):
        return lambda: None
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, keyring.reload)
    except (RuntimeError, ValueError, NotImplementedError):
        return lambda: None

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    return stop
