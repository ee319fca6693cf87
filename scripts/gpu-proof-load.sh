#!/usr/bin/env bash
# Issues 13 and 14 on two H200s (vLLM 0.26.0 from ../shared/gpu): the self-check at load.
#   startup — Llama-3-8B-shaped FP8 block checkpoint: plain vLLM (GPU 0) and gemmguard serve with
#             the default policy (GPU 1) started at once; time to ready, the self-check report,
#             replacements and their cost, peak GPU memory during start-up.
#   moe     — tiny Qwen3-MoE FP8 block checkpoint: `gemmguard selfcheck` with vLLM's default MoE
#             backend, with DeepGEMM off (Triton), with DeepGEMM forced, and with
#             --tensor-parallel-size 2.
# Run from the repo root on the device after .gpu/setup.sh; results under $OUT (one tgz).
#   OUT=/tmp/out scripts/gpu-proof-load.sh startup|moe
set -uo pipefail
part=${1:?startup or moe}
out=${OUT:?set OUT}
site=${GG_SITE:-$HOME/gg-site}
export PYTHONPATH=$site:$PWD/server
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip HF_HUB_OFFLINE=1
meta=$site/gemmguard-0.1.0.dist-info
if ! grep -q stat_logger_plugins "$meta/entry_points.txt" 2>/dev/null; then
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
  printf '[vllm.general_plugins]\ngemmguard = gemmguard.plugin:register\n\n[vllm.endpoint_plugins]\ngemmguard_api = gemmguard.endpoints:GemmguardEndpoints\n\n[vllm.stat_logger_plugins]\ngemmguard_api = gemmguard.stat_logger:TokenStatLogger\n' > "$meta/entry_points.txt"
fi
step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
py=python3
{ nvidia-smi --query-gpu=name,memory.total --format=csv; $py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"; } > "$out/versions.txt" 2>&1

wait_url() {  # url pid seconds → prints elapsed seconds or "timeout"
  local start=$(date +%s.%N)
  for _ in $(seq 1 "$3"); do
    curl -sf "$1" > /dev/null && { awk "BEGIN{print $(date +%s.%N) - $start}"; return 0; }
    kill -0 "$2" 2>/dev/null || { echo "died"; return 1; }
    sleep 0.5
  done
  echo timeout; return 1
}
peak_mem() {  # gpu seconds → max memory.used MiB while sampling
  local max=0
  for _ in $(seq 1 "$2"); do
    v=$(nvidia-smi -i "$1" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$v" ] && [ "$v" -gt "$max" ] && max=$v
    [ -f "$out/.stop-mem-$1" ] && break
    sleep 1
  done
  echo "$max" > "$out/peak-mem-gpu$1.txt"
}

if [ "$part" = startup ]; then
  model=/tmp/gg-llama8b-fp8
  step "checkpoint"; $py scripts/gpu_checkpoints.py llama8b $model > "$out/ckpt.log" 2>&1; du -sh $model >> "$out/ckpt.log"
  engine=(--gpu-memory-utilization 0.85 --max-model-len 4096)
  step "plain vLLM on GPU0 and gemmguard (policy fallback, vLLM's default kernels) on GPU1, at once"
  peak_mem 0 400 & peak_mem 1 400 &
  CUDA_VISIBLE_DEVICES=0 VLLM_PLUGINS=none $py -c 'import sys; from vllm.entrypoints.cli.main import main; sys.argv=["vllm","serve"]+sys.argv[1:]; main()' \
    $model --port 8100 "${engine[@]}" > "$out/plain.log" 2>&1 & plain=$!
  CUDA_VISIBLE_DEVICES=1 $py -m gemmguard.cli serve $model --port 8101 "${engine[@]}" > "$out/gemmguard.log" 2>&1 & gg=$!
  (wait_url localhost:8100/health $plain 760 > "$out/startup-plain-s.txt"; touch "$out/.stop-mem-0") &
  wait_url localhost:8101/gemmguard/ready $gg 760 > "$out/startup-gemmguard-s.txt"; touch "$out/.stop-mem-1"
  wait
  step "reports"
  curl -s localhost:8101/gemmguard/v1/selfcheck > "$out/selfcheck.json"
  curl -s localhost:8101/gemmguard/v1/kernels > "$out/kernels.json"
  curl -s localhost:8101/metrics | grep '^gemmguard_' > "$out/metrics.txt"
  curl -s localhost:8101/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "'$model'", "prompt": "Hello", "max_tokens": 8}' > "$out/completion.json"
  kill $plain $gg 2>/dev/null; wait
  grep -c "Starting vLLM\|EngineCore" "$out/gemmguard.log" > "$out/engine-starts.txt"
else
  model=/tmp/gg-qwen3moe-fp8
  step "checkpoint"; $py scripts/gpu_checkpoints.py qwen3moe $model --layers 2 --experts 16 --top-k 4 > "$out/ckpt.log" 2>&1
  engine=(--enforce-eager --gpu-memory-utilization 0.3 --max-model-len 1024)
  check() {  # name gpu env... → selfcheck JSON
    local name=$1 gpu=$2; shift 2
    env CUDA_VISIBLE_DEVICES=$gpu "$@" timeout 300 $py -m gemmguard.cli selfcheck $model --json "${engine[@]}" \
      > "$out/moe-$name.json" 2> "$out/moe-$name.log"; echo "$name rc=$?" >> "$out/steps.log"
    env CUDA_VISIBLE_DEVICES=$gpu "$@" timeout 200 $py -m gemmguard.cli kernels $model --json "${engine[@]}" \
      > "$out/moe-$name-kernels.json" 2> "$out/moe-$name-kernels.log"
  }
  step "default backend (GPU0) | DeepGEMM off (GPU1)"
  check default 0 VLLM_LOGGING_LEVEL=INFO & check no-deepgemm 1 VLLM_USE_DEEP_GEMM=0 & wait
  step "tensor parallel 2"
  CUDA_VISIBLE_DEVICES=0,1 timeout 300 $py -m gemmguard.cli selfcheck $model --json "${engine[@]}" --tensor-parallel-size 2 \
    > "$out/moe-tp2.json" 2> "$out/moe-tp2.log"; echo "tp2 rc=$?" >> "$out/steps.log"
  # DeepGEMM forced (VLLM_USE_DEEP_GEMM=1 VLLM_MOE_USE_DEEP_GEMM=1) JIT-compiles for minutes:
  # run it as `check deepgemm 0 VLLM_USE_DEEP_GEMM=1 VLLM_MOE_USE_DEEP_GEMM=1` when time allows.
fi
step done
rm -f "$out"/.stop-mem-*
tar czf /tmp/gpu-proof-$part.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/gpu-proof-$part.tgz "$out/"
