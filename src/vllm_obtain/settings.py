"""All configuration in one place: CLI flags > OBTAIN_* env vars > platform .env file > defaults.

Each field here is the one source of a setting: its env var (OBTAIN_<FIELD>), its command-line
flag (cli.py generates them from these fields), its default and its help text (also README's
configuration table, which a test keeps in step with this file).
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from vllm_obtain.engines.registry import ENGINE_NAMES

PLATFORM_ENV_FILES = {"Darwin": ".env.mac", "Linux": ".env.linux", "Windows": ".env.windows"}
ENGINE_CHOICES = ("auto", *ENGINE_NAMES)
# `--ray` with no address: a Ray of our own, started and stopped with the server.
LOCAL_RAY = "local"
# What Ray takes for a cluster's address: host:port (its GCS), or a Ray Client URL.
RAY_ADDRESS = re.compile(r"^(rays?://\S+|[^\s/:]+:\d+)$")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds_in(value: Any) -> Any:
    """'90m', '12h', '30d' -> seconds; a bare number is seconds already."""
    if isinstance(value, str) and value.strip()[-1:].lower() in DURATION_UNITS:
        text = value.strip()
        try:
            return float(text[:-1]) * DURATION_UNITS[text[-1].lower()]
        except ValueError:
            raise ValueError(f"not a duration: {value!r} (say 90m, 12h, 30d)") from None
    return value


SIZE_UNITS = {
    "": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
    "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
    "tib": 1 << 40,
}  # fmt: skip


def budget_bytes(value: str, *, capacity: int) -> int:
    """'80%' of `capacity` bytes, or a size ('12GiB', '512M', '2e9'), in bytes."""
    text = value.strip().lower().replace(" ", "")
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return int(capacity * share / 100)
        number = text.rstrip("kmgtib")
        unit = text[len(number) :]
        size = int(float(number) * SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise ValueError(f"not a memory budget: {value!r} (say 80%, 12GiB or 512MiB)") from None
    if size <= 0:
        raise ValueError(f"not a memory budget: {value!r} (it must be above 0)")
    return size


def size_bytes(value: str) -> int:
    """A size ('20GiB', '500MB', '2e9') in bytes: budget_bytes without a share of anything."""
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    try:
        size = int(float(number) * SIZE_UNITS[text[len(number) :]])
    except (ValueError, KeyError, OverflowError):
        raise ValueError(f"not a size: {value!r} (say 20GiB, 500MB or 2e9)") from None
    if size <= 0:
        raise ValueError(f"not a size: {value!r} (it must be above 0)")
    return size


RATE_WINDOWS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
                "hour": 3600}  # fmt: skip


def rate_limit(value: str) -> tuple[int, float]:
    """'600/min' -> (600, 60.0): so many per so many seconds; a bare number is per minute."""
    count, _, per = value.strip().lower().partition("/")
    try:
        amount = int(count)
        window = RATE_WINDOWS[per.strip() or "min"]
    except (ValueError, KeyError):
        raise ValueError(f"not a rate: {value!r} (say 600/min, 10/s or 5000/h)") from None
    if amount < 1:
        raise ValueError(f"not a rate: {value!r} (it must be at least 1)")
    return amount, float(window)


def replica_range(value: str) -> tuple[int, int]:
    """'1:4' -> (1, 4): the fewest and the most replicas autoscaling keeps."""
    low, sep, high = value.partition(":")
    try:
        fewest, most = int(low), int(high)
    except ValueError:
        raise ValueError(f"not a replica range: {value!r} (say 1:4)") from None
    if not sep or fewest < 1 or most < fewest:
        raise ValueError(f"not a replica range: {value!r} (MIN:MAX, 1 <= MIN <= MAX)")
    return fewest, most


def platform_env_file(system: str | None = None) -> str:
    """The config file for this OS (.env.mac, .env.linux or .env.windows), read from the cwd."""
    return PLATFORM_ENV_FILES.get(system or platform.system(), ".env")


def shown(
    default: str | None = None,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    env: str | None = None,
    choices: tuple[str, ...] | None = None,
    const: str | None = None,
) -> dict[str, Any]:
    """How a setting is shown where the field alone does not say it well: its default in
    words, a flag or env var spelt otherwise than the field (`--api-key` for `api_keys`);
    `const`: the value of the flag given without one (`--ray` alone)."""
    extra = {
        "default": default,
        "flag": flag,
        "metavar": metavar,
        "env": env,
        "choices": choices,
        "const": const,
    }
    return {"cli": {key: value for key, value in extra.items() if value is not None}}


class Settings(BaseSettings):
    """Server settings. Each field is also the env var OBTAIN_<FIELD> (e.g. OBTAIN_PORT)."""

    model_config = SettingsConfigDict(
        env_prefix="OBTAIN_", env_file=platform_env_file(), extra="ignore"
    )

    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a model to load at start and keep loaded: alias, .gguf path, Hugging Face "
        "directory, name under models/ or pulled id, optionally NAME@ENGINE; repeatable (every "
        "other installed model loads when a request names it)",
        json_schema_extra=shown("smollm2-135m-instruct", flag="MODEL", env="OBTAIN_MODEL (m1,m2)"),
    )
    served_model_name: str | None = Field(
        None,
        description="model id clients use for the first model",
        json_schema_extra=shown("the alias"),
    )
    keep_alive: Annotated[float, BeforeValidator(seconds_in)] = Field(
        300,
        ge=-1,
        description="how long a model loaded on demand stays loaded after its last request "
        "(5m, 1h, or seconds); -1: for ever; 0: unloaded right after",
        json_schema_extra=shown("5m"),
    )
    memory_budget: str = Field(
        "80%",
        description="memory models may take together (a share of the GPU's memory with a "
        "CUDA/ROCm GPU, else of RAM, or a size: 12GiB); idle models are unloaded, least "
        "recently used first, to make room",
    )
    max_loaded_models: int = Field(
        0, ge=0, description="models loaded at once at most; 0: as many as the memory budget holds"
    )
    embedding_model: str = Field(
        "all-minilm-l6-v2",
        description="for /v1/embeddings: alias, .gguf file or BERT folder; 'none' to serve none",
    )
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 for all")
    port: int = Field(8001, description="port to listen on")
    engine: str = Field(
        "auto",
        description="inference engine; auto: chosen from the hardware and the model",
        json_schema_extra=shown(choices=ENGINE_CHOICES),
    )
    mode: Literal["dev", "prod"] = Field(
        "prod", description="prod: JSON log lines; dev: readable logs, reload on code change"
    )
    log_level: str | None = Field(
        None, description="DEBUG, INFO, WARNING...", json_schema_extra=shown("INFO (DEBUG in dev)")
    )
    ctx_size: int = Field(
        0,
        ge=0,
        description="tokens one request may hold (prompt and answer); 0: the model's own, as "
        "far as the memory budget allows its KV cache",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads", json_schema_extra=shown("all cores")
    )
    batch_size: int = Field(512, ge=1, description="llama.cpp: tokens per decoding step")
    parallel: int = Field(
        16,
        ge=1,
        description="llama.cpp: sequences decoded together; vLLM on CPU: sequences its KV "
        "cache is sized for",
    )
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        description="llama.cpp (and vLLM on CPU without --kv-cache-gib): KV cache cells, "
        "shared by all requests; 0: 2048 per parallel sequence up to 32768, never less than "
        "the context, within the memory budget",
    )
    kv_unified: bool = Field(
        True,
        description="llama.cpp: one KV pool for all sequences, so one request may use the whole "
        "context; off: an equal share per sequence (each then holds at most kv-cache-tokens / "
        "parallel, but attends over its own cells only)",
    )
    gpu_layers: int = Field(
        -1, description="layers offloaded when llama.cpp has a GPU backend; -1: all"
    )
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template file to use instead of the model's",
        json_schema_extra=shown("the model's"),
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="a vLLM engine argument (tensor_parallel_size=2, ...); repeatable",
        json_schema_extra=shown(
            "", flag="--vllm-arg", metavar="KEY=VALUE", env="OBTAIN_VLLM_ARGS (JSON)"
        ),
    )
    kv_cache_gib: Annotated[float, Field(gt=0)] | Literal["free"] | None = Field(
        None,
        description="vLLM on CPU: KV cache size in GiB (0.5, 2) or 'free'; unset: what the "
        "model needs, as llama.cpp's (--kv-cache-tokens, else 2048 tokens per --parallel "
        "sequence up to 32768, never less than the context), within the memory budget; 'free': "
        "all that is free on its NUMA node less about 2 GiB (vLLM's own sizing, blind to the "
        "budget and to other processes; counted as 4 GiB until loaded)",
        json_schema_extra=shown("the model's need", metavar="GIB"),
    )
    max_batch: int = Field(32, ge=1, description="MLX: sequences decoded together")
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="vLLM: GPUs one model is split over (tensor parallel); with --ray, vLLM's "
        "Ray executor places them",
    )
    pipeline_parallel: int = Field(
        1,
        ge=1,
        description="vLLM: pipeline stages, each on GPUs of its own; with --ray they may be on "
        "different nodes",
    )
    # --- past one machine: Ray Serve -------------------------------------------------------
    ray: str | None = Field(
        None,
        description="serve on a Ray cluster: its ADDRESS as Ray takes it (host:6379, "
        "ray://host:10001), auto (the cluster this machine belongs to), or nothing: a local "
        "Ray started and stopped with the server",
        json_schema_extra=shown("off", flag="--ray", metavar="ADDRESS", const=LOCAL_RAY),
    )
    replicas: int = Field(1, ge=1, description="with --ray: engine replicas of each model")
    autoscale: str | None = Field(
        None,
        description="with --ray: MIN:MAX replicas of each model, scaled on the requests each "
        "replica has in hand (instead of --replicas)",
        json_schema_extra=shown("off", metavar="MIN:MAX"),
    )
    replica_cpus: float | None = Field(
        None,
        gt=0,
        description="with --ray: CPUs each engine replica reserves",
        json_schema_extra=shown("--threads, else 1"),
    )
    replica_gpus: float | None = Field(
        None,
        ge=0,
        description="with --ray: GPUs each engine replica reserves",
        json_schema_extra=shown("vLLM on a cluster with GPUs: 1, or one per shard; else 0"),
    )
    ray_proxy: Literal["haproxy", "python"] = Field(
        "haproxy",
        description="with a Ray of our own (--ray alone): Serve's HTTP proxy, HAProxy (faster "
        "here; it also serves its stats on port 8404 and metrics on 9101 of every interface) "
        "or Serve's Python proxy; a cluster's is chosen where its head starts "
        "(RAY_SERVE_ENABLE_HA_PROXY=1)",
    )
    # --- production: access, limits, recovery -----------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a key clients must send as 'Authorization: Bearer KEY'; repeatable",
        json_schema_extra=shown(
            "none: open", flag="--api-key", metavar="KEY", env="OBTAIN_API_KEYS (k1,k2)"
        ),
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a key that may also manage the server (/admin/*: pull, load, unload) and "
        "read a protected /metrics; repeatable. Without any key, /admin/* serves loopback "
        "clients only",
        json_schema_extra=shown(
            "none", flag="--admin-key", metavar="KEY", env="OBTAIN_ADMIN_KEYS (k1,k2)"
        ),
    )
    api_keys_file: Path | None = Field(
        None,
        description="named keys, one 'NAME: KEY' per line ('NAME: KEY admin' for an admin "
        "key); re-read on SIGHUP; the name is in each request's log line and metrics",
        json_schema_extra=shown("none", metavar="PATH"),
    )
    auth_health: bool = Field(False, description="/health* needs a key too")
    auth_metrics: bool = Field(False, description="/metrics needs an admin key too")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a host name clients may call this server by (as in the Host header: "
        "api.example.com, *.example.com) besides IP addresses, localhost and this machine's "
        "names; repeatable; '*' for any (this check stops DNS rebinding)",
        json_schema_extra=shown(
            "IPs, localhost, this machine's names",
            flag="--allowed-host",
            metavar="NAME",
            env="OBTAIN_ALLOWED_HOSTS (h1,h2)",
        ),
    )
    rate_limit_requests: str | None = Field(
        None,
        description="requests per key (per client address without keys) to /v1/*: N/min, "
        "N/s or N/h; then 429 with Retry-After",
        json_schema_extra=shown("off", metavar="N/min"),
    )
    rate_limit_tokens: str | None = Field(
        None,
        description="prompt and generated tokens per key (per client address without keys): "
        "N/min, N/s or N/h; then 429 with Retry-After",
        json_schema_extra=shown("off", metavar="N/min"),
    )
    pull_allow_http: bool = Field(
        False, description="/admin/pull and pull may fetch plain http:// URLs (else https only)"
    )
    pull_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a host (as in the URL, or an IP address) a pull may reach although it "
        "resolves to a loopback, private, link-local or multicast address; repeatable",
        json_schema_extra=shown(
            "none", flag="--pull-allow-host", metavar="HOST", env="OBTAIN_PULL_ALLOW_HOSTS (h1,h2)"
        ),
    )
    pull_max_size: str | None = Field(
        None,
        description="largest file a pull may write (a size: 20GiB); checked before and while "
        "downloading",
        json_schema_extra=shown("the free disk less 1 GiB", metavar="SIZE"),
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a browser origin allowed, '*' for any; repeatable",
        json_schema_extra=shown(
            "none: no CORS",
            flag="--cors-origin",
            metavar="ORIGIN",
            env="OBTAIN_CORS_ORIGINS (o1,o2)",
        ),
    )
    ui: bool = Field(
        True,
        description="the web playground and dashboard at /; --no-ui: / answers a short JSON "
        "pointing at /v1",
    )
    max_queue: int = Field(
        256, ge=0, description="sequences that may wait per model beyond those running; then 429"
    )
    request_timeout: float = Field(
        600, gt=0, description="seconds a request may take, queueing included; then 504"
    )
    max_body_mb: float = Field(8, gt=0, description="largest request body in MiB; then 413")
    max_prompt_tokens: int = Field(
        0,
        ge=0,
        description="longest prompt in tokens; then 400 prompt_too_long",
        json_schema_extra=shown("the context"),
    )
    max_tokens_limit: int = Field(
        0,
        ge=0,
        description="largest max_tokens; then 400; also the default when unset",
        json_schema_extra=shown("the context"),
    )
    engine_isolation: Literal["process", "none"] = Field(
        "process",
        description="process: the engine runs in a worker process restarted after a crash; "
        "none: in the server",
    )
    engine_hang_timeout: float = Field(
        120,
        ge=2,
        description="seconds a busy engine may make no progress before it is killed and "
        "restarted; at least 2 (the engine process beats every second)",
    )
    engine_max_restarts: int = Field(
        5,
        ge=0,
        description="restarts in 10 minutes before the engine is given up (/health/live fails)",
    )
    shutdown_timeout: float = Field(
        30, ge=0, description="on SIGTERM, seconds streams in flight get to finish"
    )
    responses_store: Literal["sqlite", "none"] = Field(
        "sqlite",
        description="where /v1/responses keeps stored responses: sqlite (a file in the cache "
        "directory, kept across restarts), or none (store is off, previous_response_id a 400)",
    )
    responses_max_age: Annotated[float, BeforeValidator(seconds_in)] = Field(
        30 * 86400,
        gt=0,
        description="how long a stored response is kept (90m, 12h, 30d, or seconds)",
        json_schema_extra=shown("30d"),
    )
    responses_max_stored: int = Field(
        100_000, ge=1, description="stored responses kept at most; the oldest go first"
    )
    log_prompts: bool = Field(
        False, description="put prompt text in request log lines (private data!)"
    )
    models_dir: Path = Field(Path("models"), description="local models")
    cache_dir: Path = Field(Path("cache"), description="downloads and converted weights")
    logs_dir: Path = Field(Path("logs"), description="rotating log files (50 MB x 5)")

    @field_validator(
        "api_keys",
        "admin_keys",
        "cors_origins",
        "allowed_hosts",
        "pull_allow_hosts",
        "model",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """OBTAIN_API_KEYS=key1,key2 (or a JSON list) in env files."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("memory_budget")
    @classmethod
    def _budget_readable(cls, value: str) -> str:
        budget_bytes(value, capacity=1 << 30)  # raises on what cannot be read
        return value

    @field_validator("ray")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        # `serve --ray MODEL` would take the model for the address.
        if value is not None and value not in (LOCAL_RAY, "auto") and not RAY_ADDRESS.match(value):
            raise ValueError(
                f"not a Ray address: {value!r} (host:6379, ray://host:10001, auto or local; "
                "name models before --ray)"
            )
        return value

    @field_validator("pull_max_size")
    @classmethod
    def _size_readable(cls, value: str | None) -> str | None:
        if value is not None:
            size_bytes(value)  # raises on what cannot be read
        return value

    @field_validator("rate_limit_requests", "rate_limit_tokens")
    @classmethod
    def _rate_readable(cls, value: str | None) -> str | None:
        if value is not None:
            rate_limit(value)  # raises on what cannot be read
        return value

    @field_validator("autoscale")
    @classmethod
    def _autoscale_readable(cls, value: str | None) -> str | None:
        if value is not None:
            replica_range(value)  # raises on what cannot be read
        return value

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ENGINE_CHOICES:
            raise ValueError(f"unknown engine {value!r}: one of {', '.join(ENGINE_CHOICES)}")
        return value

    @property
    def pull_max_bytes(self) -> int | None:
        """--pull-max-size in bytes; None: each pull is capped by the free disk."""
        return size_bytes(self.pull_max_size) if self.pull_max_size is not None else None

    @property
    def effective_log_level(self) -> str:
        return (self.log_level or ("DEBUG" if self.mode == "dev" else "INFO")).upper()


def shown_as(name: str) -> dict[str, Any]:
    """What `shown` recorded for the field `name` (empty when nothing)."""
    extra = Settings.model_fields[name].json_schema_extra
    recorded = extra.get("cli") if isinstance(extra, dict) else None
    return recorded if isinstance(recorded, dict) else {}


def flag_of(name: str) -> str:
    return str(shown_as(name).get("flag", "--" + name.replace("_", "-")))


def env_of(name: str) -> str:
    return str(shown_as(name).get("env", f"OBTAIN_{name.upper()}"))


def default_of(name: str) -> str:
    """A field's default as people read it: `shown`'s words, else the value itself."""
    shown_default = shown_as(name).get("default")
    if shown_default is not None:
        return str(shown_default)
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if default is None:
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default}/" if isinstance(default, Path) else str(default)


def choices_of(name: str) -> tuple[str, ...]:
    """The values a setting takes, when they are a fixed few (empty otherwise)."""
    shown_choices = shown_as(name).get("choices")
    if shown_choices:
        return tuple(shown_choices)
    annotation = Settings.model_fields[name].annotation
    return tuple(get_args(annotation)) if get_origin(annotation) is Literal else ()


def settings_table() -> str:
    """README's configuration table, made from the fields."""
    rows = ["| flag | env var | default | |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag = flag_of(name)
        metavar = shown_as(name).get("metavar")
        if metavar and "const" in shown_as(name):  # the value may be left out
            metavar = f"[{metavar}]"
        flag_text = f"`{flag} {metavar}`" if metavar else f"`{flag}`"
        if flag == "MODEL":
            flag_text = "`MODEL` (positional)"
        env = env_of(name)
        env_name, _, env_note = env.partition(" ")
        env_text = f"`{env_name}`" + (f" {env_note}" if env_note else "")
        default = default_of(name)
        # Values in code type; defaults in words (the model's, off) as they are.
        worded = " " in default or default in ("on", "off") or "'" in default
        default_text = f"`{default}`" if default and not worded else default
        described = str(field.description)
        if choices := choices_of(name):
            described += " (" + ", ".join(f"`{choice}`" for choice in choices) + ")"
        rows.append(f"| {flag_text} | {env_text} | {default_text} | {described} |")
    return "\n".join(rows)


def split_engine(spec: str, default: str) -> tuple[str, str]:
    """`NAME@ENGINE` -> (NAME, ENGINE); a plain NAME keeps the default engine choice."""
    name, at, engine = spec.rpartition("@")
    if at and engine in ENGINE_NAMES:
        return name, engine
    return spec, default


if __name__ == "__main__":  # python -m vllm_obtain.settings: README's table, to paste in
    print(settings_table())
