"""All configuration in one place: CLI flags > OBTAIN_* env vars > platform .env file > defaults."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PLATFORM_ENV_FILES = {"Darwin": ".env.mac", "Linux": ".env.linux", "Windows": ".env.windows"}


def platform_env_file(system: str | None = None) -> str:
    """The config file for this OS (.env.mac, .env.linux or .env.windows), read from the cwd."""
    return PLATFORM_ENV_FILES.get(system or platform.system(), ".env")


class Settings(BaseSettings):
    """Server settings. Each field is also the env var OBTAIN_<FIELD> (e.g. OBTAIN_PORT)."""

    model_config = SettingsConfigDict(
        env_prefix="OBTAIN_", env_file=platform_env_file(), extra="ignore"
    )

    model: str | None = Field(
        None, description="alias, .gguf path or models/ name; unset: embedded"
    )
    served_model_name: str | None = Field(None, description="id clients use; default: the alias")
    engine: Literal["auto", "llama.cpp", "vllm", "mlx"] = "auto"
    host: str = "127.0.0.1"
    port: int = 8001
    mode: Literal["dev", "prod"] = "prod"
    log_level: str | None = Field(None, description="default: DEBUG in dev, INFO in prod")
    ctx_size: int = Field(0, ge=0, description="context length in tokens; 0: the model's own")
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores")
    batch_size: int = Field(512, ge=1, description="llama.cpp: tokens evaluated per step")
    parallel: int = Field(16, ge=1, description="llama.cpp: sequences decoded together")
    kv_cache_tokens: int = Field(
        0, ge=0, description="llama.cpp: KV cache cells shared by all sequences; 0: automatic"
    )
    gpu_layers: int = Field(-1, description="layers offloaded to a GPU when there is one; -1: all")
    chat_template: str | None = Field(None, description="a Jinja chat template file to use instead")
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description='vLLM engine arguments, e.g. {"tensor_parallel_size": 2} (JSON in env)',
    )
    kv_cache_gib: int | None = Field(None, ge=1, description="vLLM on CPU: KV cache size in GiB")
    max_batch: int = Field(32, ge=1, description="MLX: sequences decoded together")
    models_dir: Path = Path("models")
    cache_dir: Path = Path("cache")
    logs_dir: Path = Path("logs")

    @property
    def effective_log_level(self) -> str:
        return (self.log_level or ("DEBUG" if self.mode == "dev" else "INFO")).upper()
