#!/usr/bin/env bash
# Prints the CMake flags llama.cpp is built with on this machine (install.sh builds
# llama-cpp-python with them; benchmarks/build_llama_server.sh builds llama.cpp's own server
# with the same ones, so the two are compared on equal terms).
#
#   scripts/llama-cmake-args.sh              the GPU backend found here, else the CPU's flags
#   scripts/llama-cmake-args.sh --cpu-only   the CPU's flags only
#
# The first line of stderr says which backend was chosen and why.
set -euo pipefail

CPU_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-only) CPU_ONLY=1 ;;
    *) echo "llama-cmake-args.sh: unknown option $arg (--cpu-only is the only one)" >&2; exit 2 ;;
  esac
done

# llama.cpp's default native build (GGML_NATIVE) turns on every instruction set the CPU reports,
# AMX included, and llama.cpp's AMX kernels crash on virtualised Intel Xeons at the first token
# (ggml_backend_amx_mul_mat; Ollama dies the same way on such VMs). So on x86-64 we build
# non-native, enable the AVX/AVX2/AVX-512 flags this CPU really has, and keep AMX off.
# Multimodal support (LLAVA_BUILD) is not used and is skipped.
cpu_args() {
  local args="-DLLAVA_BUILD=OFF"
  if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
    local flags; flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
    args+=" -DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
    args+=" -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)"
    args+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
    args+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
    args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  fi
  echo "$args"
}

nvcc_path() {
  command -v nvcc 2>/dev/null && return 0
  for candidate in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
    [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && { echo "$candidate/bin/nvcc"; return 0; }
  done
  return 1
}

# The compute capabilities of the GPUs present, as CMake wants them: "90;86".
cuda_architectures() {
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  local caps
  caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd ';')
  [ -n "$caps" ] && echo "$caps"
}

# A CUDA toolkit without a GPU (a build box, a CI runner) still builds for the CPU: a CUDA build
# takes far longer and gains nothing there.
nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# ROCm's tools live in /opt/rocm/bin, which its packages do not put on PATH.
rocm_tool() {
  command -v "$1" 2>/dev/null && return 0
  [ -x "${ROCM_PATH:-/opt/rocm}/bin/$1" ] && echo "${ROCM_PATH:-/opt/rocm}/bin/$1"
}

# The gfx targets of the AMD GPUs present, as CMake wants them: "gfx90a;gfx1100".
rocm_targets() {
  local rocminfo targets
  rocminfo=$(rocm_tool rocminfo) || return 1
  targets=$("$rocminfo" 2>/dev/null | grep -o 'gfx[0-9a-f]*' | sort -u | paste -sd ';')
  [ -n "$targets" ] && echo "$targets"
}

args=$(cpu_args)
os=$(uname -s)
if [ "$CPU_ONLY" = 1 ]; then
  echo "llama.cpp backend: CPU (--cpu-only)" >&2
elif [ "$os" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  echo "llama.cpp backend: Metal (Apple Silicon; llama.cpp's default there)" >&2
elif nvidia_gpu && nvcc=$(nvcc_path); then
  archs=$(cuda_architectures || true)
  echo "llama.cpp backend: CUDA ($nvcc, GPU architectures ${archs:-the CMake defaults})" >&2
  args+=" -DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$nvcc"
  [ -n "$archs" ] && args+=" -DCMAKE_CUDA_ARCHITECTURES=$archs"
elif [ -e /dev/kfd ] && hipconfig=$(rocm_tool hipconfig); then
  targets=$(rocm_targets || true)
  echo "llama.cpp backend: ROCm/HIP ($hipconfig, GPU targets ${targets:-the CMake defaults})" >&2
  args+=" -DGGML_HIP=on"
  # llama.cpp's build docs compile HIP with ROCm's own clang (HIPCXX="$(hipconfig -l)/clang").
  hip_clang="$("$hipconfig" -l 2>/dev/null || true)/clang"
  [ -x "$hip_clang" ] && args+=" -DCMAKE_HIP_COMPILER=$hip_clang"
  [ -n "$targets" ] && args+=" -DGPU_TARGETS=$targets"
elif nvidia_gpu; then
  echo "llama.cpp backend: CPU (an NVIDIA GPU is present but no CUDA toolkit (nvcc) was found: install it, e.g. apt-get install nvidia-cuda-toolkit, and run ./install.sh again to use the GPU)" >&2
elif [ -e /dev/kfd ]; then
  echo "llama.cpp backend: CPU (an AMD GPU is present but ROCm's hipconfig was not found: install ROCm and run ./install.sh again to use the GPU)" >&2
elif nvcc_path >/dev/null; then
  echo "llama.cpp backend: CPU (no GPU found: a CUDA toolkit is here, but nvidia-smi lists no GPU)" >&2
else
  echo "llama.cpp backend: CPU (no GPU found)" >&2
fi
echo "$args"
