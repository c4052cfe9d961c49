#!/usr/bin/env bash
# Builds llama.cpp's own C++ server (llama-server) from the llama.cpp that our llama-cpp-python
# vendors, with the same CMake flags install.sh uses, and prints the binary's path. The build
# takes 10-25 minutes on 2 cores, so the binary is cached outside the repository
# (~/.cache/vllm-obtain/llama-server-<version>-<flags hash>/) and never built in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SPEC=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
VERSION=${SPEC#*==}
ARGS=${CMAKE_ARGS:-$(scripts/llama-cmake-args.sh 2>/dev/null)}
KEY=$(printf '%s' "$ARGS" | sha256sum | cut -c1-12)
DIR=${LLAMA_SERVER_CACHE:-$HOME/.cache/vllm-obtain}/llama-server-$VERSION-$KEY
BIN=$DIR/build/bin/llama-server
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi

mkdir -p "$DIR"
echo "building llama-server from $SPEC's llama.cpp in $DIR (10-25 minutes)" >&2
if [ ! -d "$DIR/src" ]; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$DIR/sdist" "$SPEC" >&2
  tar -xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$DIR" >&2
  mv "$DIR"/llama_cpp_python-*/vendor/llama.cpp "$DIR/src"
  rm -rf "$DIR"/llama_cpp_python-* "$DIR/sdist"
fi
# shellcheck disable=SC2086  # ARGS is a list of flags
cmake -S "$DIR/src" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $ARGS >&2
cmake --build "$DIR/build" --target llama-server -j "$(nproc)" >&2
echo "$BIN"
