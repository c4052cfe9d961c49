"""What machine this is, and which engine should serve a model on it.

Detection gathers facts (`detect_platform`); the choice is a pure function of those facts
(`choose_engine`), so every branch is testable without the hardware.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_obtain.contract import EngineNotInstalledError
from vllm_obtain.engines.registry import ENGINES, installed_engines, llama_cpp_gpu_offload
from vllm_obtain.weights.catalog import ModelFormat

RAY_INSTALL_HINT = "./install.sh --ray, or pip install 'vllm-obtain[ray]'"

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
    # Whether the installed llama.cpp build can offload to a GPU; None: llama.cpp is not installed.
    llama_gpu_offload: bool | None = None

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine == "arm64"

    @property
    def has_cuda_or_rocm(self) -> bool:
        return bool(self.gpus)

    @property
    def gpu_name(self) -> str | None:
        """The GPU llama.cpp would offload to, in words; None without one."""
        if self.gpus:
            return f"the {self.gpus[0].vendor.upper()} GPU"
        return "the Apple GPU (Metal)" if self.apple_silicon else None


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
        return "llama.cpp", _why_llama_cpp(info)
    if installed:
        return installed[0], "the only engine installed"
    raise EngineNotInstalledError(
        f"no inference engine is installed: {ENGINES['llama.cpp'].install_hint}"
    )


def _why_llama_cpp(info: PlatformInfo) -> str:
    """Why llama.cpp serves a model that is not a GGUF file here, and whether on the GPU."""
    gpu = info.gpu_name
    if gpu is None:
        return "no Apple Silicon or CUDA/ROCm GPU: llama.cpp is fastest on CPU"
    if info.apple_silicon:
        missing = "MLX is not installed (./install.sh --engines llama.cpp,mlx)"
    elif info.system == "Linux":
        missing = "vLLM is not installed (./install.sh --engines llama.cpp,vllm)"
    else:
        missing = "vLLM runs on Linux only"
    if info.llama_gpu_offload is False:
        return (
            f"{missing}; llama.cpp runs on the CPU, as its build has no GPU backend "
            f"(to use the GPU: {llama_cpp_gpu_fix(info)})"
        )
    return f"{missing}: llama.cpp runs on {gpu}"


def llama_cpp_gpu_fix(info: PlatformInfo) -> str:
    """How to rebuild llama.cpp with a backend for this machine's GPU."""
    script = r".\install.ps1" if info.system == "Windows" else "./install.sh"
    if info.apple_silicon:
        return f"run {script} again without --cpu-only or CMAKE_ARGS (Metal is the default there)"
    if info.gpus and info.gpus[0].vendor == "amd":
        fix = f"run {script} again with ROCm (hipconfig) installed"
    else:
        fix = f"run {script} again with the CUDA toolkit (nvcc) installed"
    if info.system == "Windows":
        return fix
    return f"{fix}; scripts/llama-cmake-args.sh says which backend it will build, and why"


def llama_cpp_gpu_warning(info: PlatformInfo) -> str | None:
    """A warning when this machine has a GPU that the installed llama.cpp build cannot use."""
    if info.gpu_name is None or info.llama_gpu_offload is not False:
        return None
    return (
        f"warning: {info.gpu_name} is here, but this llama.cpp build has no GPU backend and runs "
        f"on the CPU. To use the GPU, {llama_cpp_gpu_fix(info)}."
    )


def detect_platform(*, probe_llama_build: bool = False) -> PlatformInfo:
    """Facts about this machine, gathered without importing any engine into this process. The
    llama.cpp build is probed (in a child: it may initialise CUDA) when there is a GPU it could
    use, or when asked."""
    info = PlatformInfo(
        system=platform.system(),
        machine=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        cpu_features=_cpu_features(),
        memory_gib=_memory_gib(),
        gpus=_nvidia_gpus() + _amd_gpus(),
        installed_engines=installed_engines(),
    )
    if probe_llama_build or info.gpu_name is not None:
        info = replace(info, llama_gpu_offload=llama_cpp_gpu_offload())
    return info


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


def ray_serve_version() -> str | None:
    """The installed Ray's version when Ray Serve is there (`serve --ray`), without importing
    it."""
    # find_spec("ray.serve") would import ray itself (seconds, and Ray's loggers) to find it.
    ray = importlib.util.find_spec("ray")
    folders = ray.submodule_search_locations if ray is not None else None
    if not folders or not any((Path(folder) / "serve").is_dir() for folder in folders):
        return None
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return None
