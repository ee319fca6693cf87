#!/usr/bin/env bash
# Issue 24: gemmguard against plain vLLM on one GPU, three servers, rotating order, A/A beside.
# Runs on the lent machine from the repo root, in the same device call that unpacks the last chunk
# of ../shared/gpu (setup.sh put vLLM 0.26.0 in $HOME/gg-site); the calls are in
# docs/benchmarks-gpu.md. Everything it measures goes into $OUT/gpu-bench.tgz.
#   OUT=/tmp/out GG_BENCH_PHASES="startup-cold" scripts/gpu-bench.sh
#
# Phases (GG_BENCH_PHASES, each fits one 10-minute call on an H100; the checkpoint and the
# compile caches stay in $HOME between calls while the machine is held):
#   startup-cold  the cold start of each arm (torch.compile cache emptied): plain-a, gemmguard,
#             then plain-b warm (benchmarks.startup_parity --rounds 0).
#   startup   after startup-cold: rounds of warm starts plain-a / gemmguard / plain-b in
#             rotating order (--warm): launch → vLLM's first log line, → /health,
#             → /gemmguard/ready, and gemmguard's self-check line; VLLM_USE_DEEP_GEMM=0 on
#             every arm, so nothing is replaced.
#   replaced-cold, replaced  the same with gemmguard on vLLM's default DeepGEMM, which its
#             self-check finds degraded and replaces in place with CUTLASS, against plain with
#             DeepGEMM off (caches of their own: the cold gemmguard start also JIT-compiles
#             DeepGEMM for the check).
#   requests  plain, gemmguard and plain-b up at once on one GPU (GG_BENCH_MEM of its memory
#             each, a fixed KV cache of GG_BENCH_KV_BYTES), only one under load at a time, the
#             order rotated every round (benchmarks.rounds), decode-heavy and prefill-heavy
#             loads, ≥ 3 rounds; then the summary (benchmarks.comparison): gemmguard /
#             mean(plain, plain-b) beside the A/A plain-b / plain. GG_BENCH_GPUS="0 1" spreads
#             the servers over two GPUs.
# Plain vLLM is vLLM's own `serve` with VLLM_PLUGINS=none (gemmguard's entry points are in the site).
set -uo pipefail
t0=$(date +%s)
out=${OUT:?set OUT to a folder for the results}
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
phases=${GG_BENCH_PHASES:-startup-cold}
budget=${GG_BENCH_BUDGET_S:-540}  # a device call may run 600 s
deadline=$((t0 + budget))
home=${GG_BENCH_HOME:-$HOME/gg-bench}  # kept between the calls of one held machine
# GG_BENCH_MODEL: an existing checkpoint (skips making one; a dry run on CPU uses the demo's).
model=${GG_BENCH_MODEL:-$home/llama8b-fp8}
res=$home/results
logs=$home/logs
served=llama8b-fp8
read -r -a gpus <<< "${GG_BENCH_GPUS:-0}"
# Loads NAME:INPUT:OUTPUT:CONCURRENCY:PROMPTS: ~11 s per decode run and ~28 s per prefill run on an
# H100 (192 prefill prompts, ~10 s, left an A/A spread of 13 % on 2026-12-07).
decode=${GG_BENCH_DECODE:-decode:128:512:64:192}
prefill=${GG_BENCH_PREFILL:-prefill:1024:128:32:512}
rounds=${GG_BENCH_ROUNDS:-1,2,3}
start_rounds=${GG_BENCH_START_ROUNDS:-2}
# The same vLLM options for every server; three share a GPU in the requests phase. A fixed KV
# cache: vLLM's memory profiling counts what the other servers allocate meanwhile and fails
# ("No available memory for the cache blocks", H100, 2026-12-07).
engine=(--max-model-len 2048 --max-num-seqs 128
        ${GG_BENCH_ENGINE_ARGS:---gpu-memory-utilization ${GG_BENCH_MEM:-0.3}
        --kv-cache-memory-bytes ${GG_BENCH_KV_BYTES:-6442450944}})

export PYTHONPATH=$site:$PWD/server:$PWD
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip VLLM_USE_DEEP_GEMM=0
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$res" "$logs"

# vLLM finds plugins by entry points, which need package metadata; the device has no pip index, so
# gemmguard's dist-info is written beside the bundle: the same entry points as pyproject.toml.
if [ -d "$site" ]; then
  meta=$site/gemmguard-0.1.0.dist-info
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
  cat > "$meta/entry_points.txt" <<'EOF'
[vllm.general_plugins]
gemmguard = gemmguard.plugin:register

[vllm.endpoint_plugins]
gemmguard_api = gemmguard.endpoints:GemmguardEndpoints

[vllm.stat_logger_plugins]
gemmguard_api = gemmguard.stat_logger:TokenStatLogger
EOF
fi

# The device call may end before the script does (device time runs out): pack what exists at each
# step, so a cut-short run still brings back its results.
pack() { tar czf "$out/gpu-bench.tgz" -C "$home" results logs 2>/dev/null; }
step() { pack; echo "== $(( $(date +%s) - t0 ))s $*" | tee -a "$logs/steps.log"; }
left() { echo $(( deadline - $(date +%s) )); }

step "versions ($phases)"
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  $py -c "from importlib.metadata import version as v; print('vllm', v('vllm'), 'torch', v('torch'))"
  git rev-parse HEAD 2>/dev/null; echo "decode=$decode prefill=$prefill engine=${engine[*]}"
} >> "$res/versions.txt" 2>&1

if [ ! -f "$model/config.json" ]; then
  step "checkpoint (Llama-3-8B shapes, FP8 128x128 blocks, random) on GPU ${gpus[0]}"
  # GG_BENCH_CHECKPOINT_ARGS (e.g. "--layers 4") makes a smaller model for a quick look.
  CUDA_VISIBLE_DEVICES=${gpus[0]} $py scripts/gpu_checkpoints.py llama8b "$model" \
    ${GG_BENCH_CHECKPOINT_ARGS:-} 2>&1 | tee -a "$logs/steps.log"
fi

startup() {  # NAME [startup_parity options]: cold starts or rotating warm rounds
  local name=$1; shift
  step "startup: $name $*"
  CUDA_VISIBLE_DEVICES=${gpus[0]} timeout $(( $(left) > 0 ? $(left) : 1 )) \
    $py -m benchmarks.startup_parity --model "$model" --rounds "$start_rounds" \
    --engine-args "${engine[*]}" \
    --cache-root "$HOME/.cache/vllm-$name" --out "$res/$phase.json" "$@" \
    2>&1 | tee -a "$logs/$phase.log"
}

# start ARM GPU PORT: launch one server in a session of its own; prints its pid.
start() {
  local arm=$1 gpu=$2 port=$3 log=$logs/$1.log
  if [ "$arm" = gemmguard ]; then
    CUDA_VISIBLE_DEVICES=$gpu VLLM_CACHE_ROOT=$HOME/.cache/vllm-startup/gemmguard \
      setsid $py -m gemmguard.cli serve "$model" --host 127.0.0.1 --port "$port" \
      --served-model-name $served "${engine[@]}" > "$log" 2>&1 &
  else  # plain and plain-b share a compile cache: the same graphs
    CUDA_VISIBLE_DEVICES=$gpu VLLM_CACHE_ROOT=$HOME/.cache/vllm-startup/plain VLLM_PLUGINS=none \
      setsid $py -m benchmarks.vllm_cli serve "$model" --host 127.0.0.1 --port "$port" \
      --served-model-name $served "${engine[@]}" > "$log" 2>&1 &
  fi
  echo $!
}

wait_up() {  # ARM PORT PID: poll until /health answers, then send one warm-up request
  local arm=$1 port=$2 pid=$3
  while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$pid" 2>/dev/null; do
    curl -sf -o /dev/null "localhost:$port/health" && break
    sleep 1
  done
  curl -sf -o /dev/null "localhost:$port/health" || {
    echo "$arm did not come up" | tee -a "$logs/steps.log"; return 1; }
  curl -s "localhost:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "'$served'", "prompt": "warm up", "max_tokens": 16}' > /dev/null
}

stop() {  # PID...: stop each server's whole session, then wait for it
  local pid
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for pid in "$@"; do
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null
  done
}

requests() {
  step "requests: plain, gemmguard, plain-b up at once (GPUs ${gpus[*]})"
  local arms=(plain gemmguard plain-b) i=0 port arm
  pids=()  # global: the EXIT trap runs after this function has returned
  trap 'stop "${pids[@]}"' EXIT
  for arm in "${arms[@]}"; do
    pids+=("$(start "$arm" "${gpus[$(( i % ${#gpus[@]} ))]}" $(( 8100 + i )))"); i=$((i + 1))
  done
  i=0
  for arm in "${arms[@]}"; do wait_up "$arm" $(( 8100 + i )) "${pids[$i]}" || return 1; i=$((i + 1)); done
  curl -s localhost:8101/gemmguard/v1/selfcheck > "$res/gemmguard-selfcheck.json"
  curl -s localhost:8101/gemmguard/v1/kernels > "$res/gemmguard-kernels.json"
  local live; live=$(curl -s localhost:8101/gemmguard/live)
  step "requests: rounds $rounds, rotating order"
  # VLLM_PLUGINS=none: the load generator imports vLLM, which would otherwise load gemmguard's plugin.
  VLLM_PLUGINS=none timeout $(( $(left) + 5 )) $py -m benchmarks.rounds --results "$res" \
    --tokenizer "$model" --served-model-name $served --rounds "$rounds" \
    --arm plain=http://127.0.0.1:8100 --arm gemmguard=http://127.0.0.1:8101 \
    --arm plain-b=http://127.0.0.1:8102 --load "$decode" --load "$prefill" \
    --deadline $(( deadline - 20 )) 2>&1 | tee -a "$logs/rounds.log"
  echo "gemmguard /gemmguard/live before: $live after: $(curl -s localhost:8101/gemmguard/live)" \
    >> "$res/canaries.txt"
  stop "${pids[@]}"; trap - EXIT
  step "summary"
  $py -m benchmarks.comparison "$res" | tee "$res/summary.md"
}

for phase in $phases; do
  case $phase in
    startup-cold) startup startup --rounds 0 ;;
    startup) startup startup --warm ;;
    replaced-cold) startup replaced --rounds 0 --env gemmguard:VLLM_USE_DEEP_GEMM=1 ;;
    replaced) startup replaced --warm --env gemmguard:VLLM_USE_DEEP_GEMM=1 ;;
    requests) requests ;;
    *) echo "unknown phase '$phase' (startup-cold, startup, replaced-cold, replaced, requests)" | tee -a "$logs/steps.log" ;;
  esac
done
step done
pack
