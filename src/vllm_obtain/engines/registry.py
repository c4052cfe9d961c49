"""Every engine this server can run, by name: how to tell it is installed, how to install it,
which weights it reads, and how to build it. The CLI, the settings, hardware detection, the
wiring and the engine process all learn engines here, and nowhere else.

Building imports the backend's package, so only the process that serves a model pays for it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_obtain.contract import Embedder, Engine, EngineConfig, WeightFormat


@dataclass(frozen=True)
class EngineSpec:
    name: str
    package: str  # the module whose presence means the engine is installed
    install_hint: str  # what to run when it is not
    weights: WeightFormat
    build: Callable[[Path, EngineConfig], Engine]


def _build_llama_cpp(model_path: Path, config: EngineConfig) -> Engine:
    from vllm_obtain.engines.llama_cpp.engine import LlamaCppEngine

    return LlamaCppEngine(
        model_path,
        context_length=config.context_length,
        threads=config.threads,
        batch_size=config.batch_size,
        gpu_layers=config.gpu_layers,
        parallel=config.parallel,
        kv_cache_tokens=config.kv_cache_tokens,
        kv_unified=config.kv_unified,
    )


def _build_vllm(model_path: Path, config: EngineConfig) -> Engine:
    from vllm_obtain.engines.vllm.engine import VllmEngine

    return VllmEngine(
        model_path,
        context_length=config.context_length,
        engine_args=config.vllm_args,
        cpu_kv_cache_gib=config.cpu_kv_cache_gib,
        ray_address=config.ray_address,
        ray_placement_group=config.ray_placement_group,
    )


def _build_mlx(model_path: Path, config: EngineConfig) -> Engine:
    from vllm_obtain.engines.mlx.engine import MlxEngine

    return MlxEngine(model_path, context_length=config.context_length, max_batch=config.max_batch)


ENGINES: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec(
            "llama.cpp",
            package="llama_cpp",
            install_hint="./install.sh (it builds llama-cpp-python for this CPU)",
            weights="gguf",
            build=_build_llama_cpp,
        ),
        EngineSpec(
            "vllm",
            package="vllm",
            install_hint="./install.sh --engines vllm (Linux; NVIDIA/AMD GPU, or vLLM's CPU build)",
            weights="hf",
            build=_build_vllm,
        ),
        EngineSpec(
            "mlx",
            package="mlx_lm",
            install_hint="./install.sh --engines mlx (Apple Silicon; CPU build elsewhere)",
            weights="hf",
            build=_build_mlx,
        ),
    )
}
ENGINE_NAMES = tuple(ENGINES)
# Embedding models are served by llama.cpp's embedding mode, whatever serves the chat model.
EMBEDDING_ENGINE = "llama.cpp"


def engine_spec(name: str) -> EngineSpec:
    spec = ENGINES.get(name)
    if spec is None:
        raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINE_NAMES)})")
    return spec


def installed_engines() -> tuple[str, ...]:
    """The engines whose package is importable here (found without importing it)."""
    return tuple(name for name, spec in ENGINES.items() if importlib.util.find_spec(spec.package))


# Importing llama_cpp loads its library and, in a CUDA build, initialises CUDA: the probe runs in
# a child, so neither the server's process nor the doctor holds that (or dies of a broken build).
_LLAMA_CPP_OFFLOAD_PROBE = (
    "import llama_cpp; llama_cpp.llama_backend_init(); "
    "print(int(llama_cpp.llama_supports_gpu_offload()))"
)


def llama_cpp_gpu_offload() -> bool | None:
    """Whether the installed llama.cpp build can offload layers to a GPU (CUDA, ROCm, Metal,
    Vulkan); None when llama-cpp-python is not installed. A build that cannot load is False."""
    if importlib.util.find_spec(ENGINES["llama.cpp"].package) is None:
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LLAMA_CPP_OFFLOAD_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "1"


def build_engine(name: str, model_path: Path, config: EngineConfig) -> Engine:
    """The engine `name` for the weights at `model_path` (imports only that engine)."""
    return engine_spec(name).build(model_path, config)


def build_embedder(model_path: Path, config: EngineConfig) -> Embedder:
    """The embedding engine for the GGUF embedding model at `model_path`."""
    from vllm_obtain.engines.llama_cpp.embedder import LlamaCppEmbedder

    return LlamaCppEmbedder(model_path, threads=config.threads)
