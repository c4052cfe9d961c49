"""All configuration in one place: CLI flags > OBTAIN_* env vars > platform .env file > defaults."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    embedding_model: str = Field(
        "all-minilm-l6-v2", description="served at /v1/embeddings; 'none' to serve none"
    )
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
    # --- production: access, limits, recovery -----------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="keys clients must send as 'Authorization: Bearer'; comma-separated in env",
    )
    auth_health: bool = Field(False, description="whether /health* also needs a key")
    auth_metrics: bool = Field(False, description="whether /metrics also needs a key")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins browsers may call from ('*': any); none: off"
    )
    max_queue: int = Field(
        256, ge=0, description="requests that may wait per model beyond those running; then 429"
    )
    request_timeout: float = Field(600, gt=0, description="seconds a request may take in all")
    max_body_mb: float = Field(8, gt=0, description="largest request body accepted, in MiB")
    max_prompt_tokens: int = Field(0, ge=0, description="longest prompt accepted; 0: the context")
    max_tokens_limit: int = Field(
        0, ge=0, description="largest max_tokens a request may ask for; 0: the context"
    )
    engine_isolation: Literal["process", "none"] = Field(
        "process", description="process: the engine runs in a child restarted after a crash"
    )
    engine_hang_timeout: float = Field(
        120, gt=0, description="seconds without progress before a busy engine counts as hung"
    )
    engine_max_restarts: int = Field(
        5, ge=0, description="restarts allowed in 10 minutes before the engine is failed"
    )
    shutdown_timeout: float = Field(
        30, ge=0, description="on SIGTERM, seconds streams in flight get to finish"
    )
    log_prompts: bool = Field(False, description="log prompt text in request lines (private!)")
    models_dir: Path = Path("models")
    cache_dir: Path = Path("cache")
    logs_dir: Path = Path("logs")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """OBTAIN_API_KEYS=key1,key2 (or a JSON list) in env files."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @property
    def effective_log_level(self) -> str:
        return (self.log_level or ("DEBUG" if self.mode == "dev" else "INFO")).upper()
