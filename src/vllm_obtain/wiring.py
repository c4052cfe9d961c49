"""From settings to a running server: pick the engine for the model on this machine (hardware),
resolve the weights in the format that engine reads (weights), run it supervised in a process
of its own (runtime), register it for the API (core), and make the app (api).

The only module that knows every layer; the CLI and uvicorn's reloader start here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fastapi import FastAPI

from vllm_obtain.api.app import ApiConfig, create_app
from vllm_obtain.contract import Embedder, Engine, EngineConfig
from vllm_obtain.core.embeddings import EmbeddingModels, ServedEmbedder
from vllm_obtain.core.registry import ModelRegistry, ServedModel, ServingLimits
from vllm_obtain.core.response_store import ResponseStore
from vllm_obtain.engines.registry import (
    EMBEDDING_ENGINE,
    build_embedder,
    build_engine,
    engine_spec,
)
from vllm_obtain.hardware import PlatformInfo, choose_engine, detect_platform
from vllm_obtain.logs import configure_logging
from vllm_obtain.runtime.supervisor import SupervisedEmbedder, SupervisedEngine
from vllm_obtain.runtime.wire import Start
from vllm_obtain.settings import Settings
from vllm_obtain.weights.catalog import (
    embedding_aliases,
    model_format,
    resolve_embedding_model,
    resolve_model,
)

# uvicorn's reloader builds the app anew in a child process; the command line's settings
# reach it in this variable, as JSON (cli.export_for_reloader).
RELOADER_OVERRIDES_ENV = "VLLM_OBTAIN_RELOADER_SETTINGS"


def create_server_app(
    settings: Settings, *, on_load_failure: Callable[[], None] | None = None
) -> FastAPI:
    """The app factory: the models the settings name, on their engines, behind the API."""
    return create_app(
        api_config(settings),
        build_registry(settings),
        embedding_models=build_embedding_models(settings),
        response_store=build_response_store(settings),
        on_load_failure=on_load_failure,
    )


def app_from_reloader() -> FastAPI:
    """The app factory for uvicorn's reloader (dev mode), in the child process it starts."""
    settings = reloader_settings()
    configure_logging_for(settings)
    return create_server_app(settings)


def reloader_settings() -> Settings:
    """The settings the command line gave (cli.export_for_reloader), over env vars and the
    .env file, as the reloader's child process sees them."""
    return Settings(**json.loads(os.environ.get(RELOADER_OVERRIDES_ENV, "{}")))


def configure_logging_for(settings: Settings) -> None:
    """Logging as the settings ask: JSON lines in prod mode, readable lines in dev."""
    configure_logging(
        level=settings.effective_log_level,
        json_lines=settings.mode == "prod",
        logs_dir=settings.logs_dir,
    )


def api_config(settings: Settings) -> ApiConfig:
    return ApiConfig(
        api_keys=tuple(settings.api_keys),
        auth_health=settings.auth_health,
        auth_metrics=settings.auth_metrics,
        cors_origins=tuple(settings.cors_origins),
        max_body_bytes=int(settings.max_body_mb * 1024 * 1024),
        log_prompts=settings.log_prompts,
    )


def build_response_store(settings: Settings) -> ResponseStore | None:
    """Where /v1/responses keeps what it answered (None: nowhere, --responses-store none)."""
    if settings.responses_store == "none":
        return None
    return ResponseStore(
        settings.cache_dir / "responses.sqlite3",
        max_age_seconds=settings.responses_max_age,
        max_rows=settings.responses_max_stored,
    )


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        context_length=settings.ctx_size,
        threads=settings.threads,
        batch_size=settings.batch_size,
        parallel=settings.parallel,
        kv_cache_tokens=settings.kv_cache_tokens,
        kv_unified=settings.kv_unified,
        gpu_layers=settings.gpu_layers,
        vllm_args=dict(settings.vllm_args),
        cpu_kv_cache_gib=settings.kv_cache_gib,
        max_batch=settings.max_batch,
    )


def limits_from(settings: Settings) -> ServingLimits:
    return ServingLimits(
        max_queue=settings.max_queue,
        request_timeout=settings.request_timeout,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens=settings.max_tokens_limit,
    )


def build_registry(settings: Settings, info: PlatformInfo | None = None) -> ModelRegistry:
    """The chat model the settings name, on the engine chosen for it here."""
    info = info or detect_platform()
    engine, _ = choose_engine(
        info, model_format(settings.model, settings.models_dir), settings.engine
    )
    resolved = resolve_model(
        settings.model,
        engine=engine,
        reads=engine_spec(engine).weights,
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
    )
    served = ServedModel(
        id=settings.served_model_name or resolved.id,
        engine=isolated_engine(engine, resolved.path, settings),
        chat_template=_read_template(settings.chat_template),
        limits=limits_from(settings),
    )
    return ModelRegistry([served])


def isolated_engine(name: str, model_path: Path, settings: Settings) -> Engine:
    """The engine in a child process the server restarts after a crash (the default), or in
    this process when isolation is off."""
    if settings.engine_isolation == "none":
        return build_engine(name, model_path, engine_config(settings))
    return SupervisedEngine(
        _start("generate", name, model_path, settings),
        hang_timeout=settings.engine_hang_timeout,
        max_restarts=settings.engine_max_restarts,
    )


def build_embedding_models(settings: Settings) -> EmbeddingModels:
    """The embedding model of the settings (none if 'none'), served by llama.cpp."""
    name = settings.embedding_model
    if name.lower() in ("", "none"):
        return EmbeddingModels()

    def weights() -> Path:
        resolved = resolve_embedding_model(
            name, models_dir=settings.models_dir, cache_dir=settings.cache_dir
        )
        return resolved.path

    def make_embedder(path: Path) -> Embedder:
        if settings.engine_isolation == "process":  # as the chat model: a crash is survived
            return SupervisedEmbedder(
                _start("embed", EMBEDDING_ENGINE, path, settings),
                hang_timeout=settings.engine_hang_timeout,
                max_restarts=settings.engine_max_restarts,
            )
        return build_embedder(path, engine_config(settings))

    model_id = (
        name if name in embedding_aliases() else Path(name).name.removesuffix(".gguf").lower()
    )
    return EmbeddingModels(
        [ServedEmbedder(model_id, weights, make_embedder, engine_name=EMBEDDING_ENGINE)]
    )


def _start(
    role: Literal["generate", "embed"], engine: str, model_path: Path, settings: Settings
) -> Start:
    return Start(role, engine, model_path, engine_config(settings), settings.effective_log_level)


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value
