"""The ASGI app: routes, error handlers, and the models' load/unload around the server's life."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from vllm_obtain import __version__
from vllm_obtain.api import chat, completions, health, models
from vllm_obtain.api.errors import install_error_handlers
from vllm_obtain.api.middleware import RequestIdMiddleware
from vllm_obtain.core.manager import ModelRegistry
from vllm_obtain.logs import configure_logging_for
from vllm_obtain.serving import build_registry
from vllm_obtain.settings import Settings


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the app; models load when it starts. Tests pass a registry of their own."""
    registry = registry if registry is not None else build_registry(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.load_all()
        try:
            yield
        finally:
            await registry.unload_all()

    app = FastAPI(title="vllm-obtain", version=__version__, lifespan=lifespan)
    app.state.registry = registry
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    for module in (chat, completions, models, health):
        app.include_router(module.router)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn's reloader (dev mode): it imports the app by name in a child process,
    which needs its logging set up again."""
    settings = Settings()
    configure_logging_for(settings)
    return create_app(settings)
