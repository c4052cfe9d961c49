import pytest

from vllm_obtain.contract import EngineNotInstalledError
from vllm_obtain.engines.registry import ENGINE_NAMES
from vllm_obtain.hardware import (
    GPU,
    PlatformInfo,
    choose_engine,
    llama_cpp_gpu_warning,
    parse_nvidia_smi,
)

ALL = ENGINE_NAMES


def machine(system="Linux", arch="x86_64", gpus=(), installed=ALL, offload=None) -> PlatformInfo:
    return PlatformInfo(
        system=system,
        machine=arch,
        cpu_count=8,
        gpus=tuple(gpus),
        installed_engines=installed,
        llama_gpu_offload=offload,
    )


MAC = machine("Darwin", "arm64")
CUDA_BOX = machine(gpus=[GPU("nvidia", "H100", 81559)])
ROCM_BOX = machine(gpus=[GPU("amd", "MI300X")])
CPU_BOX = machine()
WINDOWS = machine("Windows", "AMD64", installed=("llama.cpp",))


@pytest.mark.parametrize(
    ("info", "fmt", "expected"),
    [
        (MAC, "alias", "mlx"),
        (CUDA_BOX, "alias", "vllm"),
        (ROCM_BOX, "alias", "vllm"),
        (CPU_BOX, "alias", "llama.cpp"),
        (WINDOWS, "alias", "llama.cpp"),
        (CUDA_BOX, "gguf", "llama.cpp"),
        (MAC, "gguf", "llama.cpp"),
        (CUDA_BOX, "hf", "vllm"),
        (MAC, "hf", "mlx"),
        (CPU_BOX, "hf", "vllm"),
    ],
)
def test_auto_choice_follows_hardware_and_model_format(info, fmt, expected):
    engine, why = choose_engine(info, fmt)
    assert engine == expected
    assert why


def test_gpu_without_vllm_falls_back_to_llama_cpp():
    info = machine(gpus=[GPU("nvidia", "RTX 4090")], installed=("llama.cpp",))
    assert choose_engine(info, "alias")[0] == "llama.cpp"


def test_gpu_without_vllm_says_vllm_is_missing_and_llama_cpp_runs_on_the_gpu():
    info = machine(gpus=[GPU("nvidia", "H100")], installed=("llama.cpp",), offload=True)
    engine, why = choose_engine(info, "alias")
    assert engine == "llama.cpp"
    assert "vLLM is not installed (./install.sh --engines llama.cpp,vllm)" in why
    assert why.endswith("llama.cpp runs on the NVIDIA GPU")
    assert llama_cpp_gpu_warning(info) is None


def test_gpu_without_vllm_and_a_cpu_only_llama_cpp_build_says_it_runs_on_the_cpu_and_why():
    info = machine(gpus=[GPU("nvidia", "H100")], installed=("llama.cpp",), offload=False)
    engine, why = choose_engine(info, "alias")
    assert engine == "llama.cpp"
    assert "vLLM is not installed (./install.sh --engines llama.cpp,vllm)" in why
    assert "llama.cpp runs on the CPU, as its build has no GPU backend" in why
    assert "run ./install.sh again with the CUDA toolkit (nvcc) installed" in why
    warning = llama_cpp_gpu_warning(info)
    assert warning is not None
    assert warning.startswith("warning: the NVIDIA GPU is here")
    assert "run ./install.sh again with the CUDA toolkit (nvcc) installed" in warning


def test_without_a_gpu_llama_cpp_is_chosen_for_the_cpu_whatever_its_build():
    for offload in (True, False, None):
        info = machine(installed=("llama.cpp",), offload=offload)
        assert choose_engine(info, "alias") == (
            "llama.cpp",
            "no Apple Silicon or CUDA/ROCm GPU: llama.cpp is fastest on CPU",
        )
        assert llama_cpp_gpu_warning(info) is None


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        (
            machine(gpus=[GPU("amd", "MI300X")], installed=("llama.cpp",), offload=False),
            ["vLLM is not installed", "runs on the CPU", "with ROCm (hipconfig) installed"],
        ),
        (
            machine("Darwin", "arm64", installed=("llama.cpp",), offload=True),
            ["MLX is not installed (./install.sh --engines llama.cpp,mlx)", "Apple GPU (Metal)"],
        ),
        (
            machine("Darwin", "arm64", installed=("llama.cpp",), offload=False),
            ["MLX is not installed", "runs on the CPU", "without --cpu-only or CMAKE_ARGS"],
        ),
        (
            machine("Windows", "AMD64", [GPU("nvidia", "RTX 4090")], ("llama.cpp",), True),
            ["vLLM runs on Linux only: llama.cpp runs on the NVIDIA GPU"],
        ),
        (
            machine("Windows", "AMD64", [GPU("nvidia", "RTX 4090")], ("llama.cpp",), False),
            ["vLLM runs on Linux only", r"run .\install.ps1 again"],
        ),
    ],
)
def test_the_llama_cpp_fallback_names_the_missing_engine_and_where_llama_cpp_runs(info, expected):
    engine, why = choose_engine(info, "alias")
    assert engine == "llama.cpp"
    for text in expected:
        assert text in why
    assert (llama_cpp_gpu_warning(info) is not None) == (info.llama_gpu_offload is False)


def test_apple_silicon_without_mlx_falls_back_to_llama_cpp():
    assert choose_engine(machine("Darwin", "arm64", installed=("llama.cpp",)), "alias")[0] == (
        "llama.cpp"
    )


def test_gguf_without_llama_cpp_is_converted_for_another_engine():
    assert choose_engine(machine(installed=("vllm",)), "gguf")[0] == "vllm"


def test_explicit_engine_wins_over_auto():
    assert choose_engine(CUDA_BOX, "alias", "llama.cpp") == ("llama.cpp", "asked for with --engine")


def test_asking_for_a_missing_engine_says_how_to_install_it():
    with pytest.raises(EngineNotInstalledError, match=r"install\.sh --engines vllm"):
        choose_engine(WINDOWS, "alias", "vllm")


def test_hf_model_with_only_llama_cpp_is_a_clear_error():
    with pytest.raises(EngineNotInstalledError, match="vLLM or MLX"):
        choose_engine(WINDOWS, "hf")


def test_no_engine_at_all_is_a_clear_error():
    with pytest.raises(EngineNotInstalledError, match="no inference engine"):
        choose_engine(machine(installed=()), "alias")


def test_nvidia_smi_output_is_parsed():
    gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\nNVIDIA A10, 23028\n")
    assert gpus == (
        GPU("nvidia", "NVIDIA H100 80GB HBM3", 81559),
        GPU("nvidia", "NVIDIA A10", 23028),
    )
    assert parse_nvidia_smi("") == ()
