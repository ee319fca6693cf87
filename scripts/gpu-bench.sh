#!/usr/bin/env bash
# Issue 15: gemmguard against plain vLLM on two H200s, measured with vLLM's own `vllm bench serve`.
# Runs on the lent machine (kind nvidia-h200-x2) from the repo root, in the same device call that
# unpacks the last chunk of ../shared/gpu (setup-on-device.sh put vLLM 0.26.0 in $HOME/gg-site);
# the exact call is in docs/benchmarks-gpu.md. Everything it measures goes into $OUT/gpu-bench.tgz.
#   OUT=/tmp/out scripts/gpu-bench.sh
#
# Plan (one device call, under GG_BENCH_BUDGET_S seconds of wall clock):
#   1. a Llama-3-8B-shaped FP8 block-scaled checkpoint with random weights, made on GPU 0;
#   2. plain vLLM on GPU 0 and gemmguard on GPU 1, started at once (this start compiles);
#      A/B rounds 1-2 of `vllm bench serve`, arms alternating (ABBA) on both loads;
#   3. the swap: gemmguard on GPU 0 and a second plain vLLM on GPU 1, started beside the idle
#      first pair (torch.compile's cache is warm now); gemmguard on GPU 1 then stops; rounds 3-4
#      with three arms: gemmguard (GPU 0), plain (GPU 1) and, as `plain-b` for the A/A ratio,
#      the first plain (GPU 0); plain runs in the middle of each round, so one plain run per round
#      serves both ratios and each is taken between runs next to it in time;
#   4. the summary (python -m benchmarks.comparison), printed and packed with the raw JSONs.
# Only one server is under load at a time; a second one on the same GPU is idle meanwhile.
# Plain vLLM is vLLM's own `serve` with VLLM_PLUGINS=none (gemmguard's entry points are in the site).
# Both arms run VLLM_USE_DEEP_GEMM=0: on Hopper vLLM's default FP8 block kernel is DeepGEMM, which
# gemmguard's self-check finds degraded and replaces with CUTLASS; with DeepGEMM off both arms run
# CUTLASS, the self-check passes, and the comparison is of the request path, not of two kernels.
set -uo pipefail
t0=$(date +%s)
out=${OUT:?set OUT to a folder for the results}
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
budget=${GG_BENCH_BUDGET_S:-530}  # a device call may run 600 s; the chunk unpack takes some
deadline=$((t0 + budget))
work=${GG_BENCH_WORK:-/tmp/gg-bench}
# GG_BENCH_MODEL: an existing checkpoint (skips making one; a dry run on CPU uses the demo's).
model=${GG_BENCH_MODEL:-$work/llama8b-fp8}
res=$work/results
logs=$work/logs
served=llama8b-fp8
# Loads NAME:INPUT:OUTPUT:CONCURRENCY:PROMPTS; prompts sized for ~10-15 s per run on an H200.
decode=${GG_BENCH_DECODE:-decode:128:512:128:384}
prefill=${GG_BENCH_PREFILL:-prefill:1024:128:32:256}
# The same vLLM options for every server; two servers share a GPU in step 3, hence 0.45.
engine=(--served-model-name $served --max-model-len 2048 --max-num-seqs 128
        ${GG_BENCH_ENGINE_ARGS:---gpu-memory-utilization 0.45})

export PYTHONPATH=$site:$PWD/server:$PWD
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip VLLM_USE_DEEP_GEMM=0
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf "$work" && mkdir -p "$res" "$logs"

# vLLM finds plugins by entry points, which need package metadata; the device has no pip index, so
# gemmguard's dist-info is written beside the bundle: the same entry points as pyproject.toml.
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

# The device call may end before the script does (device time runs out): pack what exists at each
# step, so a cut-short run still brings back its results.
pack() { tar czf "$out/gpu-bench.tgz" -C "$work" results logs 2>/dev/null; }
step() { pack; echo "== $(( $(date +%s) - t0 ))s $*" | tee -a "$logs/steps.log"; }
left() { echo $(( deadline - $(date +%s) )); }

# start ARM GPU PORT START: launch one server in a session of its own; prints its pid.
start() {
  local arm=$1 gpu=$2 port=$3 n=$4 log=$logs/$1-gpu$2-start$4.log
  if [ "$arm" = gemmguard ]; then
    CUDA_VISIBLE_DEVICES=$gpu VLLM_CACHE_ROOT=$HOME/.cache/vllm-gemmguard \
      setsid $py -m gemmguard.cli serve "$model" --host 127.0.0.1 --port $port "${engine[@]}" \
      > "$log" 2>&1 &
  else  # plain and its second server share a compile cache: the same graphs
    CUDA_VISIBLE_DEVICES=$gpu VLLM_CACHE_ROOT=$HOME/.cache/vllm-plain VLLM_PLUGINS=none \
      setsid $py -m benchmarks.vllm_cli serve "$model" --host 127.0.0.1 --port $port \
      "${engine[@]}" > "$log" 2>&1 &
  fi
  echo $!
}

# wait_up ARM GPU PORT START PID T_LAUNCH: poll until serving; append its start-up to startup.jsonl.
wait_up() {
  local arm=$1 gpu=$2 port=$3 n=$4 pid=$5 t=$6 health=null ready=null now
  while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$pid" 2>/dev/null; do
    now=$(date +%s.%N)
    if [ "$health" = null ] && curl -sf -o /dev/null "localhost:$port/health"; then
      health=$(awk "BEGIN {print $now - $t}")
      [ "$arm" != gemmguard ] && break
    fi
    if [ "$health" != null ] && curl -sf -o /dev/null "localhost:$port/gemmguard/ready"; then
      ready=$(awk "BEGIN {print $now - $t}"); break
    fi
    sleep 0.5
  done
  [ "$health" = null ] && { echo "$arm on GPU $gpu did not come up" | tee -a "$logs/steps.log"; return 1; }
  printf '{"arm": "%s", "start": %s, "gpu": %s, "health_s": %s, "ready_s": %s}\n' \
    "$arm" "$n" "$gpu" "$health" "$ready" >> "$res/startup.jsonl"
  # One request before measuring, so no run pays for a server's first one.
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

rounds() {  # ROUNDS ARM=URL...: ABBA rounds of both loads, in one process
  local numbers=$1; shift
  local arms=(); for a in "$@"; do arms+=(--arm "$a"); done
  # VLLM_PLUGINS=none: the load generator imports vLLM, which would otherwise load gemmguard's plugin.
  VLLM_PLUGINS=none timeout $(( $(left) + 5 )) $py -m benchmarks.rounds --results "$res" --tokenizer "$model" \
    --served-model-name $served --rounds "$numbers" "${arms[@]}" \
    --load "$decode" --load "$prefill" --deadline $(( deadline - 20 )) 2>&1 | tee -a "$logs/rounds.log"
}

pids=()
trap 'stop "${pids[@]}"' EXIT

step versions
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  $py -c "from importlib.metadata import version as v; print('vllm', v('vllm'), 'torch', v('torch'))"
  git rev-parse HEAD 2>/dev/null; echo "decode=$decode prefill=$prefill engine=${engine[*]}"
} > "$res/versions.txt" 2>&1

if [ -z "${GG_BENCH_MODEL:-}" ]; then
  step "checkpoint (Llama-3-8B shapes, FP8 128x128 blocks, random) on GPU 0"
  # GG_BENCH_CHECKPOINT_ARGS (e.g. "--layers 4") makes a smaller model for a quick look.
  CUDA_VISIBLE_DEVICES=0 $py scripts/gpu_checkpoints.py llama8b "$model" ${GG_BENCH_CHECKPOINT_ARGS:-} \
    2>&1 | tee -a "$logs/steps.log"
fi

step "start 1: plain on GPU 0, gemmguard on GPU 1 (compiles)"
t=$(date +%s.%N); p0=$(start plain 0 8100 1); g1=$(start gemmguard 1 8101 1); pids+=("$p0" "$g1")
wait_up plain 0 8100 1 "$p0" "$t" & wait_up gemmguard 1 8101 1 "$g1" "$t" & wait
curl -s localhost:8101/gemmguard/v1/selfcheck > "$res/gemmguard-selfcheck.json"
curl -s localhost:8101/gemmguard/v1/kernels > "$res/gemmguard-kernels.json"

step "A/B rounds 1-2: plain GPU 0, gemmguard GPU 1"
live1=$(curl -s localhost:8101/gemmguard/live)
rounds 1,2 plain=http://127.0.0.1:8100 gemmguard=http://127.0.0.1:8101
echo "gemmguard GPU 1 /gemmguard/live before: $live1 after: $(curl -s localhost:8101/gemmguard/live)" \
  >> "$res/canaries.txt"

if [ "$(left)" -gt 120 ]; then
  step "start 2 (the swap): gemmguard on GPU 0, plain on GPU 1, beside the idle first pair"
  t=$(date +%s.%N); g0=$(start gemmguard 0 8200 2); p1=$(start plain 1 8201 2); pids+=("$g0" "$p1")
  wait_up gemmguard 0 8200 2 "$g0" "$t" & wait_up plain 1 8201 2 "$p1" "$t" & wait
  stop "$g1"  # idle from here on, and its canary would run beside the GPU 1 plain
  step "rounds 3-4: gemmguard GPU 0, plain GPU 1, plain-b (the first plain) GPU 0"
  live2=$(curl -s localhost:8200/gemmguard/live)
  rounds 3,4 gemmguard=http://127.0.0.1:8200 plain=http://127.0.0.1:8201 \
    plain-b=http://127.0.0.1:8100
  echo "gemmguard GPU 0 /gemmguard/live before: $live2 after: $(curl -s localhost:8200/gemmguard/live)" \
    >> "$res/canaries.txt"
else
  step "no time left for the swap: $(left) s"
fi

step "summary"
stop "${pids[@]}"; pids=()
$py -m benchmarks.comparison "$res" | tee "$res/summary.md"
step done
# The device returns a limited number of files: pack them into one.
pack
