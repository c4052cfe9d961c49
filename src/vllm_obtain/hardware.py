"""What machine this is, and which engine should serve a model on it.

Detection gathers facts (`detect_platform`); the choice is a pure function of those facts
(`choose_engine`), so every branch is testable without the hardware.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vllm_obtain.contract import EngineNotInstalledError
from vllm_obtain.engines.registry import ENGINES, installed_engines
from vllm_obtain.weights.catalog import ModelFormat

CPU_FEATURES = ("avx", "avx2", "avx512f", "avx512_bf16", "amx_tile", "neon", "asimd")


@dataclass(frozen=True)
class GPU:
    vendor: str  # "nvidia" or "amd"
    name: str
    memory_mib: int | None = None


@dataclass(frozen=True)
class PlatformInfo:
    system: str  # Linux, Darwin, Windows
    machine: str  # x86_64, arm64, aarch64, AMD64
    cpu_count: int
    cpu_features: tuple[str, ...] = ()
    memory_gib: float | None = None
    gpus: tuple[GPU, ...] = ()
    installed_engines: tuple[str, ...] = field(default=())

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine == "arm64"

    @property
    def has_cuda_or_rocm(self) -> bool:
        return bool(self.gpus)


def choose_engine(
    info: PlatformInfo, model_format: ModelFormat, requested: str = "auto"
) -> tuple[str, str]:
    """(engine, why). MLX on Apple Silicon; vLLM with a CUDA/ROCm GPU for Hugging Face-format
    models; llama.cpp for GGUF files and everywhere else."""
    if requested != "auto":
        if requested not in info.installed_engines:
            raise EngineNotInstalledError(
                f"the {requested} engine is not installed: {ENGINES[requested].install_hint}"
            )
        return requested, "asked for with --engine"
    installed = info.installed_engines
    if model_format == "gguf":
        if "llama.cpp" in installed:
            return "llama.cpp", "the model is a GGUF file, llama.cpp's own format"
        for engine in ("vllm", "mlx"):
            if engine in installed:
                return engine, f"GGUF file converted for {engine} (llama.cpp is not installed)"
    if info.apple_silicon and "mlx" in installed:
        return "mlx", "Apple Silicon: MLX runs on its unified memory and GPU"
    if info.has_cuda_or_rocm and "vllm" in installed:
        return "vllm", f"{info.gpus[0].vendor.upper()} GPU found: vLLM batches on it"
    if model_format == "hf":
        for engine in ("vllm", "mlx"):
            if engine in installed:
                return engine, f"a Hugging Face-format model needs {engine} (llama.cpp reads GGUF)"
        raise EngineNotInstalledError(
            f"a Hugging Face-format model needs vLLM or MLX: {ENGINES['vllm'].install_hint}"
        )
    if "llama.cpp" in installed:
        return "llama.cpp", "no Apple Silicon or CUDA/ROCm GPU: llama.cpp is fastest on CPU"
    if installed:
        return installed[0], "the only engine installed"
    raise EngineNotInstalledError(
        f"no inference engine is installed: {ENGINES['llama.cpp'].install_hint}"
    )


def detect_platform() -> PlatformInfo:
    """Facts about this machine, gathered without importing any engine."""
    return PlatformInfo(
        system=platform.system(),
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        cpu_features=_cpu_features(),
        memory_gib=_memory_gib(),
        gpus=_nvidia_gpus() + _amd_gpus(),
        installed_engines=installed_engines(),
    )


def _cpu_features() -> tuple[str, ...]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return ("neon",) if platform.machine() == "arm64" else ()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in CPU_FEATURES if f in flags)
    return ()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):
        return None  # Windows has no sysconf


def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _nvidia_gpus() -> tuple[GPU, ...]:
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    return parse_nvidia_smi(out or "")


def parse_nvidia_smi(output: str) -> tuple[GPU, ...]:
    gpus = []
    for line in output.strip().splitlines():
        name, _, memory = line.rpartition(",")
        if name:
            gpus.append(
                GPU("nvidia", name.strip(), int(memory) if memory.strip().isdigit() else None)
            )
    return tuple(gpus)


def _amd_gpus() -> tuple[GPU, ...]:
    # /dev/kfd is the ROCm compute interface: present only with a ROCm-capable GPU and driver.
    if not Path("/dev/kfd").exists():
        return ()
    out = _run(["rocm-smi", "--showproductname", "--csv"]) or ""
    names = [line.split(",")[1] for line in out.splitlines()[1:] if line.count(",") >= 1]
    return tuple(GPU("amd", name.strip() or "AMD GPU") for name in names) or (
        GPU("amd", "AMD GPU"),
    )
