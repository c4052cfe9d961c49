"""How much memory a model will take once loaded, estimated before loading it: its weights as
the engine holds them, its KV cache for the context and parallelism it is given, and what the
engine's process takes besides. The memory budget (core.residency) is checked against this.

Read from the weights' own metadata (a GGUF header, a config.json), never by loading them.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from vllm_obtain.contract import EngineConfig
from vllm_obtain.contract.kv_layout import MIN_KV_TOKENS, auto_kv_tokens

MIB, GIB = 1 << 20, 1 << 30
# What an engine's process holds besides weights and KV cache: the interpreter, the engine's
# libraries, compute buffers (measured on CPU here: llama.cpp ~70 MiB with a 135M model; vLLM
# 2.5 GiB, resident in its three processes after a load of long prompts: our engine process
# with vLLM's front end and tokenizer 0.8, its engine core 0.65, its worker 1.1 besides weights
# and KV cache; MLX ~0.5 GiB), rounded up.
RUNTIME_BYTES = {"llama.cpp": 128 * MIB, "vllm": 2816 * MIB, "mlx": 768 * MIB}
# The context counted for a GGUF whose header does not say (llama.cpp then reads its default).
LLAMA_CPP_UNKNOWN_CONTEXT = 4096
MLX_DEFAULT_CONTEXT = 4096  # engines/mlx/engine.py, for a config without max_position_embeddings
# vLLM on CPU with --kv-cache-gib free sizes its KV cache from what is free: counted as this
# until it is loaded (then as what its processes hold).
VLLM_CPU_FREE_KV_BYTES = 4 * GIB
# vLLM on CPU for a model whose config.json does not give its shape: vLLM's former default.
VLLM_CPU_UNKNOWN_KV_BYTES = 4 * GIB
# vLLM's CPU backend pages its KV cache in blocks of this many tokens (platforms/cpu.py), and
# one block (the null block) is never given to a request.
VLLM_CPU_BLOCK_TOKENS = 128
VLLM_GPU_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
KV_BYTES_PER_VALUE = 2  # f16 keys and values
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz")


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache depends on."""

    layers: int
    kv_heads: int
    head_dim: int
    trained_context: int
    parameters: int = 0  # 0: unknown

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES_PER_VALUE


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime


def gguf_shape(path: Path) -> ModelShape | None:
    """The shape a GGUF file's header declares (None when the header lacks it)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _gguf_shape(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _gguf_shape(path: Path, size: int, mtime_ns: int) -> ModelShape | None:
    """gguf_shape, read once per file version: /v1/models lists every installed model."""
    try:
        with path.open("rb") as stream:
            metadata, parameters = read_gguf_header(stream)
    except (OSError, ValueError, struct.error):
        return None
    arch = metadata.get("general.architecture")

    def number(key: str) -> int:
        found = metadata.get(f"{arch}.{key}")
        return found if isinstance(found, int) else 0

    layers, heads, width = (
        number("block_count"),
        number("attention.head_count"),
        number("embedding_length"),
    )
    if not (layers and heads and width):
        return None
    kv_heads = number("attention.head_count_kv") or heads
    head_dim = number("attention.key_length") or width // heads
    context = number("context_length")
    return ModelShape(layers, kv_heads, head_dim, context, parameters)


# GGUF value types (ggml's gguf.h): struct formats of the fixed-size ones; 8 string, 9 array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(stream: BinaryIO) -> tuple[dict[str, object], int]:
    """A GGUF file's scalar metadata and its parameter count, from its header alone.

    The gguf package's reader parses every array (a 50k-token vocabulary) in Python, two
    seconds per file; this skips arrays, so estimating a model costs milliseconds."""

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, stream.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return stream.read(unpack("<Q")).decode("utf-8", "replace")

    def value(kind: int) -> object:
        if kind in _GGUF_SCALARS:
            return unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            item, count = unpack("<I"), unpack("<Q")
            if item in _GGUF_SCALARS:
                stream.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")

    if stream.read(4) != b"GGUF" or unpack("<I") < 2:
        raise ValueError("not a GGUF file (version 2 or later)")
    tensors, entries = unpack("<Q"), unpack("<Q")
    metadata: dict[str, object] = {}
    for _ in range(entries):
        key = string()
        metadata[key] = value(unpack("<I"))
    parameters = 0
    for _ in range(tensors):
        string()  # the tensor's name
        dims = [unpack("<Q") for _ in range(unpack("<I"))]
        stream.seek(4 + 8, 1)  # its type and offset
        parameters += math.prod(dims)
    return metadata, parameters


def hf_shape(folder: Path) -> ModelShape | None:
    """The shape a Hugging Face config.json declares."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # multimodal configs nest the language model
    layers, heads = config.get("num_hidden_layers"), config.get("num_attention_heads")
    width = config.get("hidden_size")
    if not (layers and heads and width):
        return None
    return ModelShape(
        layers=int(layers),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or width // heads),
        trained_context=int(config.get("max_position_embeddings") or 0),
    )


def weights_bytes(path: Path) -> int:
    """A file's size, or the weight files' in a folder (hub snapshots link to their blobs);
    safetensors alone where a folder also has other copies of the weights."""
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.rglob("*") if f.is_file() and f.name.endswith(HF_WEIGHT_SUFFIXES)]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix == ".safetensors"]
    return sum(f.stat().st_size for f in files)


def estimate_footprint(
    path: Path,
    *,
    engine: str,
    config: EngineConfig,
    gpu_memory: int | None = None,
) -> Footprint:
    """What `engine` will hold serving the weights at `path` (a GGUF file, converted to bf16
    for an engine that reads Hugging Face weights, or a Hugging Face folder) with `config`.
    `gpu_memory`: the GPU's size in bytes when the engine runs on one."""
    shape = gguf_shape(path) if path.is_file() else hf_shape(path)
    weights = weights_bytes(path)
    if path.is_file() and engine != "llama.cpp" and shape is not None and shape.parameters:
        weights = shape.parameters * 2  # converted to bfloat16 (weights/gguf_to_hf.py)
    runtime = RUNTIME_BYTES.get(engine, 512 * MIB)
    if engine == "vllm":
        if gpu_memory is not None:  # vLLM takes its share of the GPU whatever the model
            share = float(config.vllm_args.get("gpu_memory_utilization", VLLM_GPU_UTILIZATION))
            return Footprint(weights=int(gpu_memory * share), kv_cache=0, runtime=0)
        return Footprint(weights, vllm_cpu_kv_bytes(shape, config), runtime)
    if shape is None:
        return Footprint(weights, 0, runtime)
    if engine == "llama.cpp":
        tokens = kv_cache_tokens(shape, config, engine)
    else:  # MLX allocates as sequences grow: counted as one sequence at its whole context
        tokens = model_context(shape, config, engine)
    return Footprint(weights, tokens * shape.kv_bytes_per_token, runtime)


def model_context(shape: ModelShape, config: EngineConfig, engine: str) -> int:
    """The context the engine gives the model: --ctx-size, else the model's own."""
    unknown = LLAMA_CPP_UNKNOWN_CONTEXT if engine == "llama.cpp" else MLX_DEFAULT_CONTEXT
    return config.context_length or shape.trained_context or unknown


def kv_cache_tokens(shape: ModelShape, config: EngineConfig, engine: str) -> int:
    """The KV cells llama.cpp allocates, and vLLM on a CPU is sized for, with `config`: the
    operator's, else room for the parallel sequences and one whole context (kv_layout)."""
    context = model_context(shape, config, engine)
    return config.kv_cache_tokens or auto_kv_tokens(context, config.parallel)


def vllm_cpu_kv_bytes(shape: ModelShape | None, config: EngineConfig) -> int:
    """The KV cache vLLM on a CPU is given: --kv-cache-gib, else what `kv_cache_tokens` need
    in whole blocks plus the null block (so that a request may hold all of them)."""
    asked = config.cpu_kv_cache_gib
    if isinstance(asked, str):  # "free": vLLM's own sizing, unknown before it runs
        return VLLM_CPU_FREE_KV_BYTES
    if asked is not None:
        return int(asked * GIB)
    if shape is None:
        return VLLM_CPU_UNKNOWN_KV_BYTES
    blocks = -(-kv_cache_tokens(shape, config, "vllm") // VLLM_CPU_BLOCK_TOKENS) + 1
    return blocks * VLLM_CPU_BLOCK_TOKENS * shape.kv_bytes_per_token


def vllm_cpu_kv_tokens(shape: ModelShape, kv_bytes: int) -> int:
    """The tokens requests may hold in a vLLM KV cache of `kv_bytes` on a CPU."""
    blocks = kv_bytes // (VLLM_CPU_BLOCK_TOKENS * shape.kv_bytes_per_token) - 1  # the null one
    return max(blocks, 0) * VLLM_CPU_BLOCK_TOKENS


def planned_context(
    path: Path, *, engine: str, config: EngineConfig, gpu_memory: int | None = None
) -> int:
    """The tokens a request will be able to hold once the model is loaded with `config`, as far
    as its metadata tells before loading (0: unknown; vLLM on a GPU, or on a CPU with
    --kv-cache-gib free, decides its own). `gpu_memory` as for estimate_footprint."""
    if engine == "vllm" and (gpu_memory is not None or isinstance(config.cpu_kv_cache_gib, str)):
        return 0
    shape = gguf_shape(path) if path.is_file() else hf_shape(path)
    if shape is None:
        return config.context_length
    context = model_context(shape, config, engine)
    if engine == "vllm":  # max_model_len -1: the model's own context, or what the cache holds
        return min(context, vllm_cpu_kv_tokens(shape, vllm_cpu_kv_bytes(shape, config)))
    if engine != "llama.cpp":
        return context
    pool = kv_cache_tokens(shape, config, engine)
    return min(context, pool if config.kv_unified else pool // config.parallel)


def fit_kv_cache(
    path: Path,
    *,
    engine: str,
    config: EngineConfig,
    budget: int,
    gpu_memory: int | None = None,
) -> EngineConfig:
    """`config` with the automatic KV cache (llama.cpp's pool, vLLM's on a CPU) shrunk so that
    the model fits `budget` alone, and the context with it (a request may use at most the
    cache); as it is where it fits, where the operator sized the cache, for other engines, and
    where nothing above MIN_KV_TOKENS would fit (the load is then refused as too large, saying
    so). vLLM on a CPU is also told its size (cpu_kv_cache_gib), which it would otherwise take
    from all that is free. `gpu_memory` as for estimate_footprint."""
    if engine == "vllm":
        if gpu_memory is not None or config.cpu_kv_cache_gib is not None:
            return config
        return _fit_vllm_cpu_kv_cache(path, config, budget)
    if engine != "llama.cpp" or config.kv_cache_tokens or not path.is_file():
        return config
    shape = gguf_shape(path)
    if shape is None:
        return config
    footprint = estimate_footprint(path, engine=engine, config=config)
    if footprint.total <= budget:
        return config
    room = budget - footprint.weights - footprint.runtime
    tokens = room // shape.kv_bytes_per_token // 256 * 256  # llama.cpp pads to 256 cells
    if tokens < MIN_KV_TOKENS:
        return config
    context = model_context(shape, config, engine)
    return replace(config, kv_cache_tokens=tokens, context_length=min(context, tokens))


def _fit_vllm_cpu_kv_cache(path: Path, config: EngineConfig, budget: int) -> EngineConfig:
    """fit_kv_cache for vLLM on a CPU without --kv-cache-gib: its KV cache in GiB (exact: a
    whole number of bytes over a power of two), for the tokens the budget holds; left to vLLM
    where the operator sized it with vLLM's own arguments (--vllm-arg)."""
    asked = config.vllm_args.get("kv_cache_memory_bytes")
    if isinstance(asked, int):
        return replace(config, cpu_kv_cache_gib=asked / GIB)
    if asked is not None or "gpu_memory_utilization" in config.vllm_args:
        return replace(config, cpu_kv_cache_gib="free")  # vLLM's sizing, by their numbers
    shape = gguf_shape(path) if path.is_file() else hf_shape(path)
    sized = replace(config, cpu_kv_cache_gib=vllm_cpu_kv_bytes(shape, config) / GIB)
    footprint = estimate_footprint(path, engine="vllm", config=sized)
    if shape is None or config.kv_cache_tokens or footprint.total <= budget:
        return sized
    room = budget - footprint.weights - footprint.runtime
    tokens = vllm_cpu_kv_tokens(shape, room)
    if tokens < MIN_KV_TOKENS:
        return sized
    context = min(model_context(shape, config, "vllm"), tokens)
    fitted = replace(config, kv_cache_tokens=tokens, context_length=context)
    return replace(fitted, cpu_kv_cache_gib=vllm_cpu_kv_bytes(shape, fitted) / GIB)
