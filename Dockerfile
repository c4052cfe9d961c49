# syntax=docker/dockerfile:1
# The CPU image: vllm-obtain with the llama.cpp engine and the embedded model (SmolLM2-135M).
#
#   docker build -t vllm-obtain:cpu .
#   docker run --init -p 8001:8001 -e OBTAIN_API_KEYS=sk-change-me vllm-obtain:cpu
#
# For NVIDIA GPUs see "Docker" in README.md (vLLM, or llama.cpp built with CUDA).

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md install.sh run.py .env.linux ./
COPY src ./src
COPY scripts ./scripts
# install.sh tunes llama.cpp to the CPU it builds on; an image runs on other CPUs, so it gets a
# portable x86-64 build instead: AVX2/FMA (any x86 server since 2013), no AVX-512, no AMX.
# Override with --build-arg CMAKE_ARGS=... (e.g. add -DGGML_AVX512=ON for your fleet).
ARG CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
RUN CMAKE_ARGS="$CMAKE_ARGS" ./install.sh --engines llama.cpp

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 obtain
WORKDIR /app
COPY --from=build --chown=obtain:obtain /app /app
USER obtain
ENV OBTAIN_HOST=0.0.0.0 \
    OBTAIN_PORT=8001 \
    OBTAIN_MODE=prod
EXPOSE 8001
VOLUME ["/app/models", "/app/cache", "/app/logs"]
# Readiness: 200 once the model is loaded and while the engine serves (503 while restarting).
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8001/health/ready || exit 1
# The server is PID 1's child under --init / `init: true`; SIGTERM lets streams in flight
# finish (OBTAIN_SHUTDOWN_TIMEOUT, 30 s) before it exits: give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
CMD [".venv/bin/vllm-obtain", "serve"]
