"""From settings to a running server: pick the engine for the model on this machine (hardware),
resolve the weights in the format that engine reads (weights), run it supervised in a process
of its own (runtime), register it for the API (core), and make the app (api).

The only module that knows every layer; the CLI and uvicorn's reloader start here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from loguru import logger

from vllm_obtain.api.admin import ModelPuller
from vllm_obtain.api.app import ApiConfig, create_app

# KeysFileError: for the CLI, which reports a keys file it cannot read (and imports no api).
from vllm_obtain.api.keys import Keyring
from vllm_obtain.api.keys import KeysFileError as KeysFileError
from vllm_obtain.api.rate_limits import Rate
from vllm_obtain.contract import Embedder, Engine, EngineConfig, EngineNotInstalledError
from vllm_obtain.core.embeddings import EmbeddingModels, ServedEmbedder
from vllm_obtain.core.registry import ModelRegistry, ModelSource
from vllm_obtain.core.residency import ResidencyPolicy
from vllm_obtain.core.response_store import ResponseStore
from vllm_obtain.core.served_model import ServedModel, ServingLimits
from vllm_obtain.doctor import system_report
from vllm_obtain.engines.registry import (
    EMBEDDING_ENGINE,
    build_embedder,
    build_engine,
    engine_spec,
)
from vllm_obtain.hardware import PlatformInfo, choose_engine, detect_platform
from vllm_obtain.logs import LOG_FILE, configure_logging
from vllm_obtain.runtime.supervisor import SupervisedEmbedder, SupervisedEngine
from vllm_obtain.runtime.wire import Start
from vllm_obtain.settings import Settings, budget_bytes, rate_limit, split_engine
from vllm_obtain.weights.catalog import (
    ModelResolutionError,
    embedding_aliases,
    load_catalog,
    local_model_id,
    local_model_path,
    model_format,
    resolve_embedding_model,
    resolve_model,
)
from vllm_obtain.weights.footprint import (
    GIB,
    estimate_footprint,
    fit_kv_cache,
    planned_context,
)
from vllm_obtain.weights.gguf_to_hf import gguf_to_hf
from vllm_obtain.weights.inventory import (
    InstalledModel,
    find_installed,
    installed_models,
    size_on_disk,
)
from vllm_obtain.weights.pull import PullPolicy, PullProgress, pull

# uvicorn's reloader builds the app anew in a child process; the command line's settings
# reach it in this variable, as JSON (cli.export_for_reloader).
RELOADER_OVERRIDES_ENV = "VLLM_OBTAIN_RELOADER_SETTINGS"


def create_server_app(
    settings: Settings,
    *,
    on_load_failure: Callable[[], None] | None = None,
    registry: ModelRegistry | None = None,
) -> FastAPI:
    """The app factory: the models the settings name, on their engines, behind the API.

    `registry`: models whose engines run elsewhere instead (the replicas of a Ray Serve
    deployment, cluster.ingress); Ray Serve's proxy is then in front of the app: it sets
    X-Request-ID itself, and a pull would only reach this one machine's disk."""
    on_cluster = registry is not None
    config = dataclasses.replace(api_config(settings), request_id_header=not on_cluster)
    return create_app(
        config,
        registry if registry is not None else build_registry(settings),
        embedding_models=build_embedding_models(settings),
        response_store=build_response_store(settings),
        on_load_failure=on_load_failure,
        model_puller=None if on_cluster else model_puller(settings),
        system_report=functools.cache(functools.partial(system_report, settings)),
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


def configure_logging_for(settings: Settings, *, file_name: str = LOG_FILE) -> None:
    """Logging as the settings ask: JSON lines in prod mode, readable lines in dev."""
    configure_logging(
        level=settings.effective_log_level,
        json_lines=settings.mode == "prod",
        logs_dir=settings.logs_dir,
        file_name=file_name,
    )


def api_config(settings: Settings) -> ApiConfig:
    return ApiConfig(
        keyring=Keyring(settings.api_keys, settings.admin_keys, settings.api_keys_file),
        auth_health=settings.auth_health,
        auth_metrics=settings.auth_metrics,
        cors_origins=tuple(settings.cors_origins),
        max_body_bytes=int(settings.max_body_mb * 1024 * 1024),
        log_prompts=settings.log_prompts,
        allowed_hosts=tuple(settings.allowed_hosts),
        rate_limit_requests=_rate(settings.rate_limit_requests),
        rate_limit_tokens=_rate(settings.rate_limit_tokens),
        ui=settings.ui,
    )


def _rate(text: str | None) -> Rate | None:
    return None if text is None else Rate(*rate_limit(text))


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
        vllm_args=vllm_arguments(settings),
        cpu_kv_cache_gib=settings.kv_cache_gib,
        max_batch=settings.max_batch,
    )


def vllm_arguments(settings: Settings) -> dict[str, Any]:
    """vLLM's engine arguments: the parallelism flags, then --vllm-arg (which names them
    exactly, so it wins)."""
    parallel: dict[str, Any] = {}
    if settings.tensor_parallel > 1:
        parallel["tensor_parallel_size"] = settings.tensor_parallel
    if settings.pipeline_parallel > 1:
        parallel["pipeline_parallel_size"] = settings.pipeline_parallel
    return {**parallel, **settings.vllm_args}


def limits_from(settings: Settings) -> ServingLimits:
    return ServingLimits(
        max_queue=settings.max_queue,
        request_timeout=settings.request_timeout,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens=settings.max_tokens_limit,
    )


def residency_policy(settings: Settings, info: PlatformInfo) -> ResidencyPolicy:
    """The memory budget (a share of the GPU's memory with a CUDA/ROCm GPU, else of RAM), the
    cap on loaded models and the keep-alive the settings ask for."""
    return ResidencyPolicy(
        memory_budget=budget_bytes(settings.memory_budget, capacity=memory_capacity(info)),
        max_loaded=settings.max_loaded_models,
        keep_alive=settings.keep_alive,
    )


def memory_capacity(info: PlatformInfo) -> int:
    """The memory models load into: the first GPU's with a CUDA/ROCm GPU, else RAM (unified
    memory on Apple Silicon)."""
    if info.has_cuda_or_rocm and info.gpus[0].memory_mib:
        return info.gpus[0].memory_mib << 20
    return int((info.memory_gib or 8.0) * GIB)


def build_registry(settings: Settings, info: PlatformInfo | None = None) -> ModelRegistry:
    """The models named in the settings (the default model when none is), loaded at start and
    kept; and every other installed model, loaded when a request names it."""
    info = info or detect_platform()
    named = [named_model(spec, settings) for spec in settings.model or [default_model()]]
    if settings.served_model_name:
        model, engine, _ = named[0]
        named[0] = (dataclasses.replace(model, id=settings.served_model_name), engine, model.id)
    pinned = [
        model_source(model, settings, info, engine, pinned=True, fetch_as=fetch_as)
        for model, engine, fetch_as in named
    ]
    taken_ids = {model.id for model, _, _ in named}
    taken_paths = {model.path.resolve() for model, _, _ in named if model.path.exists()}

    def discover() -> list[ModelSource]:
        sources = []
        for model in installed_models(settings.models_dir, settings.cache_dir):
            if model.id in taken_ids or model.path.resolve() in taken_paths:
                continue
            try:
                sources.append(model_source(model, settings, info, settings.engine))
            except (EngineNotInstalledError, ModelResolutionError) as exc:
                logger.debug("not serving {}: {}", model.id, exc)
        return sources

    return ModelRegistry(
        sources=[*pinned, *discover()],
        policy=residency_policy(settings, info),
        discover=discover,
        wait_timeout=settings.request_timeout,
    )


def default_model() -> str:
    return str(load_catalog()["default"])


def named_model(spec: str, settings: Settings) -> tuple[InstalledModel, str, str]:
    """A model named at start, `NAME` or `NAME@ENGINE`: (the model, the engine asked for, the
    name to fetch it by)."""
    name, engine = split_engine(spec, settings.engine)
    installed = find_installed(name, settings.models_dir, settings.cache_dir)
    if installed is not None:
        return installed, engine, name
    fmt = model_format(name, settings.models_dir)  # an unknown name is refused here
    if fmt == "alias":  # not on disk yet: resolve_model fetches it when it loads
        return InstalledModel(name, Path(name), "alias", 0, "alias"), engine, name
    path = local_model_path(name, settings.models_dir)
    assert path is not None  # model_format found it
    installed = InstalledModel(local_model_id(path), path, fmt, size_on_disk(path), "models")
    return installed, engine, name


def model_source(
    model: InstalledModel,
    settings: Settings,
    info: PlatformInfo,
    requested: str,
    *,
    pinned: bool = False,
    fetch_as: str | None = None,
    config: EngineConfig | None = None,
) -> ModelSource:
    """How to serve an installed model: on the engine `doctor` would choose for its format here
    (or the one asked for), and what it will take in memory. `config`: the engine's, instead
    of the settings' (a cluster replica adds what sharding over Ray needs)."""
    engine, _ = choose_engine(info, model.format, requested)
    reads = engine_spec(engine).weights
    if model.format == "hf" and reads == "gguf":
        raise ModelResolutionError(
            f"{engine} needs a GGUF file and '{model.id}' is a Hugging Face directory: "
            "name it as NAME@vllm or NAME@mlx"
        )

    def weights() -> Path:
        if model.format == "alias":
            return resolve_model(
                fetch_as or model.id,
                engine=engine,
                reads=reads,
                models_dir=settings.models_dir,
                cache_dir=settings.cache_dir,
            ).path
        if reads == "hf" and model.path.is_file():
            return gguf_to_hf(model.path, settings.cache_dir)
        return model.path

    config = config or model_engine_config(settings, info, engine)
    budget = budget_bytes(settings.memory_budget, capacity=memory_capacity(info))
    gpu = memory_capacity(info) if info.has_cuda_or_rocm else None

    def build() -> ServedModel:
        path = weights()  # an alias is only fetched now: fitted to the budget once it is here
        fitted = fit_kv_cache(path, engine=engine, config=config, budget=budget, gpu_memory=gpu)
        if fitted.kv_cache_tokens != config.kv_cache_tokens:  # shrunk to fit the budget
            logger.warning(
                "{}: the memory budget ({:.1f} GiB) holds a KV cache of {} tokens beside the "
                "weights, so a request may hold {} tokens; --memory-budget or --ctx-size "
                "change it",
                model.id,
                budget / GIB,
                fitted.kv_cache_tokens,
                planned_context(path, engine=engine, config=fitted, gpu_memory=gpu),
            )
        return ServedModel(
            id=model.id,
            engine=isolated_engine(engine, path, settings, fitted),
            # --chat-template is for the models named at start, not whatever else loads.
            chat_template=read_template(settings.chat_template) if pinned else None,
            limits=limits_from(settings),
        )

    estimate = context = 0
    if model.path.exists():
        planned = fit_kv_cache(
            model.path, engine=engine, config=config, budget=budget, gpu_memory=gpu
        )
        estimate = estimate_footprint(
            model.path, engine=engine, config=planned, gpu_memory=gpu
        ).total
        context = planned_context(model.path, engine=engine, config=planned, gpu_memory=gpu)
    return ModelSource(
        id=model.id,
        engine=engine,
        build=build,
        format=weights_format(model),
        size_bytes=model.size_bytes,
        estimated_bytes=estimate,
        context_length=context,
        pinned=pinned,
    )


def model_engine_config(settings: Settings, info: PlatformInfo, engine: str) -> EngineConfig:
    """The settings' engine configuration, for one model: vLLM on a GPU takes the memory
    budget's share of it (its own default, 90 %, would exceed the default budget), unless
    --vllm-arg gpu_memory_utilization says otherwise."""
    config = engine_config(settings)
    if engine != "vllm" or not info.has_cuda_or_rocm:
        return config
    if "gpu_memory_utilization" in config.vllm_args:
        return config
    capacity = memory_capacity(info)
    share = min(budget_bytes(settings.memory_budget, capacity=capacity) / capacity, 0.95)
    vllm_args = {**config.vllm_args, "gpu_memory_utilization": round(share, 4)}
    return dataclasses.replace(config, vllm_args=vllm_args)


def model_puller(settings: Settings) -> ModelPuller:
    """POST /admin/pull's download: weights.pull into the settings' folders, a URL guarded by
    the pull settings (its client chooses it: never an internal address unless allowed)."""
    policy = PullPolicy(
        allow_http=settings.pull_allow_http,
        allow_hosts=frozenset(settings.pull_allow_hosts),
        max_bytes=settings.pull_max_bytes,
    )

    def pull_model(name: str, sha256: str | None, report: Callable[[dict[str, Any]], None]) -> str:
        def on_progress(progress: PullProgress) -> None:
            report(dataclasses.asdict(progress))

        return pull(
            name,
            models_dir=settings.models_dir,
            cache_dir=settings.cache_dir,
            sha256=sha256,
            on_progress=on_progress,
            policy=policy,
        ).id

    return pull_model


def weights_format(model: InstalledModel) -> str:
    """What the weights on disk are: an alias says so once it is downloaded."""
    if model.format != "alias" or not model.path.exists():
        return model.format
    return "gguf" if model.path.is_file() else "hf"


def isolated_engine(
    name: str, model_path: Path, settings: Settings, config: EngineConfig | None = None
) -> Engine:
    """The engine in a child process the server restarts after a crash (the default), or in
    this process when isolation is off."""
    config = config or engine_config(settings)
    if settings.engine_isolation == "none":
        return build_engine(name, model_path, config)
    return SupervisedEngine(
        Start("generate", name, model_path, config, settings.effective_log_level),
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
                Start(
                    "embed",
                    EMBEDDING_ENGINE,
                    path,
                    engine_config(settings),
                    settings.effective_log_level,
                ),
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


def read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value
