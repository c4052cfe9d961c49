"""From settings to served models: pick the engine for the model on this machine, resolve the
weights in the format that engine reads, build it."""

from __future__ import annotations

from pathlib import Path

from vllm_obtain.catalog import (
    embedding_aliases,
    model_format,
    resolve_embedding_model,
    resolve_model,
)
from vllm_obtain.core.embeddings import Embedder, EmbeddingModels, ServedEmbedder
from vllm_obtain.core.manager import ModelRegistry, ServedModel, ServingLimits
from vllm_obtain.engines.base import Engine
from vllm_obtain.engines.supervisor import SupervisedEmbedder, SupervisedEngine
from vllm_obtain.platform import PlatformInfo, choose_engine, detect_platform
from vllm_obtain.settings import Settings

# The embedding model's engine, by the name the worker process builds it by.
EMBEDDING_ENGINE = "llama.cpp-embeddings"


def create_engine(name: str, model_path: Path, settings: Settings) -> Engine:
    """The engine `name` for the weights at `model_path` (imports only that engine)."""
    if name == "llama.cpp":
        from vllm_obtain.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(
            model_path,
            context_length=settings.ctx_size,
            threads=settings.threads,
            batch_size=settings.batch_size,
            gpu_layers=settings.gpu_layers,
            parallel=settings.parallel,
            kv_cache_tokens=settings.kv_cache_tokens,
        )
    if name == "vllm":
        from vllm_obtain.engines.vllm import VllmEngine

        return VllmEngine(
            model_path,
            context_length=settings.ctx_size,
            engine_args=settings.vllm_args,
            cpu_kv_cache_gib=settings.kv_cache_gib,
        )
    if name == "mlx":
        from vllm_obtain.engines.mlx import MlxEngine

        return MlxEngine(model_path, context_length=settings.ctx_size, max_batch=settings.max_batch)
    raise ValueError(f"unknown engine {name!r}")


def create_embedder(model_path: Path, settings: Settings) -> Embedder:
    from vllm_obtain.engines.llama_cpp_embed import LlamaCppEmbedder

    return LlamaCppEmbedder(model_path, threads=settings.threads)


def create_any_engine(name: str, model_path: Path, settings: Settings) -> Engine | Embedder:
    """What a worker process builds: a generation engine, or the embedding engine."""
    if name == EMBEDDING_ENGINE:
        return create_embedder(model_path, settings)
    return create_engine(name, model_path, settings)


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value


def build_registry(settings: Settings, info: PlatformInfo | None = None) -> ModelRegistry:
    info = info or detect_platform()
    engine, _ = choose_engine(
        info, model_format(settings.model, settings.models_dir), settings.engine
    )
    resolved = resolve_model(
        settings.model, engine=engine, models_dir=settings.models_dir, cache_dir=settings.cache_dir
    )
    served = ServedModel(
        id=settings.served_model_name or resolved.id,
        engine=isolated_engine(engine, resolved.path, settings),
        chat_template=_read_template(settings.chat_template),
        limits=limits_from(settings),
    )
    return ModelRegistry([served])


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
                SupervisedEngine(
                    EMBEDDING_ENGINE,
                    path,
                    settings,
                    hang_timeout=settings.engine_hang_timeout,
                    max_restarts=settings.engine_max_restarts,
                )
            )
        return create_embedder(path, settings)

    model_id = (
        name if name in embedding_aliases() else Path(name).name.removesuffix(".gguf").lower()
    )
    return EmbeddingModels([ServedEmbedder(model_id, weights, make_embedder)])


def limits_from(settings: Settings) -> ServingLimits:
    return ServingLimits(
        max_queue=settings.max_queue,
        request_timeout=settings.request_timeout,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_tokens=settings.max_tokens_limit,
    )


def isolated_engine(name: str, model_path: Path, settings: Settings) -> Engine:
    """The engine in a child process the server restarts after a crash (the default), or
    in this process when isolation is off."""
    if settings.engine_isolation == "none":
        return create_engine(name, model_path, settings)
    return SupervisedEngine(
        name,
        model_path,
        settings,
        hang_timeout=settings.engine_hang_timeout,
        max_restarts=settings.engine_max_restarts,
    )
