"""From settings to served models: resolve the model, pick and build its engine."""

from __future__ import annotations

from pathlib import Path

from vllm_obtain.catalog import resolve_model
from vllm_obtain.core.manager import ModelRegistry, ServedModel
from vllm_obtain.engines.base import Engine
from vllm_obtain.settings import Settings


def choose_engine(requested: str) -> str:
    """The engine to serve with. llama.cpp is the only one so far, and the fallback everywhere."""
    return "llama.cpp" if requested == "auto" else requested


def create_engine(name: str, model_path: Path, settings: Settings) -> Engine:
    if name == "llama.cpp":
        from vllm_obtain.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine(
            model_path,
            context_length=settings.ctx_size,
            threads=settings.threads,
            batch_size=settings.batch_size,
            gpu_layers=settings.gpu_layers,
            chat_template=_read_template(settings.chat_template),
        )
    raise ValueError(f"unknown engine {name!r}")


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path.read_text(encoding="utf-8") if path.is_file() else value


def build_registry(settings: Settings) -> ModelRegistry:
    engine = choose_engine(settings.engine)
    resolved = resolve_model(
        settings.model,
        engine=engine,
        models_dir=settings.models_dir,
        cache_dir=settings.cache_dir,
    )
    served = ServedModel(
        id=settings.served_model_name or resolved.id,
        engine=create_engine(engine, resolved.path, settings),
    )
    return ModelRegistry([served])
