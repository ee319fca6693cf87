#!/usr/bin/env bash
# Issue 22 item 3 on one GPU (vLLM 0.26.0 from ../shared/gpu): the refusal's advice cures.
# A Qwen3-MoE FP8 block checkpoint made on the GPU; `gemmguard selfcheck --policy fallback` with
# vLLM's defaults (DeepGEMM on: FP8 block weights re-quantized to E8M0 for every consumer, so the
# experts fail and cannot be swapped) must refuse (exit 3) and name a cure in its report; the
# cure (its env and options, read from the JSON, not typed here) is then applied to the same
# checkpoint: the offline check must pass (exit 0) and `gemmguard serve` must start, pass and answer.
# Run from the repo root on the device after .gpu/setup.sh; results under $OUT/cure (one tgz).
#   OUT=/tmp/out scripts/gpu-cure.sh
set -uo pipefail
out=${OUT:?set OUT}/cure
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
model=${GG_CURE_MODEL:-/tmp/gg-cure/qwen3moe}
mkdir -p "$out"
export PYTHONPATH=$site:$PWD/server
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
meta=$site/gemmguard-0.1.0.dist-info
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
printf '[vllm.general_plugins]\ngemmguard = gemmguard.plugin:register\n\n[vllm.endpoint_plugins]\ngemmguard_api = gemmguard.endpoints:GemmguardEndpoints\n\n[vllm.stat_logger_plugins]\ngemmguard_api = gemmguard.stat_logger:TokenStatLogger\n' > "$meta/entry_points.txt"
engine=(--enforce-eager --gpu-memory-utilization 0.3 --max-model-len 1024)
pack() { tar czf "$OUT/cure.tgz" -C "$(dirname "$out")" cure 2>/dev/null; }
step() { pack; echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  git rev-parse HEAD 2>/dev/null; } > "$out/versions.txt" 2>&1

step "checkpoint: Qwen3-MoE FP8 block (scripts/gpu_checkpoints.py qwen3moe)"
[ -f "$model/config.json" ] || $py scripts/gpu_checkpoints.py qwen3moe "$model" >> "$out/steps.log" 2>&1

step "1. vLLM defaults, policy fallback: expect a refusal (exit 3) with a cure"
timeout 300 $py -m gemmguard.cli selfcheck "$model" --json --policy fallback "${engine[@]}" \
  > "$out/defaults.json" 2> "$out/defaults.log"
echo "exit $?" | tee -a "$out/steps.log"
grep -hE "Refused|Avoid these kernels|re-quantized" "$out/defaults.log" | cut -c1-400 | tee -a "$out/steps.log"

# The cure as the report gives it: KEY=VALUE words, then gemmguard serve options.
read -r -a cure_env < <($py -c "import json,sys; c=json.load(open(sys.argv[1]))['cure']
print(' '.join(f'{k}={v}' for k, v in c['env'].items()))" "$out/defaults.json" 2>>"$out/steps.log")
read -r -a cure_opts < <($py -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['cure']['options']))" \
  "$out/defaults.json" 2>>"$out/steps.log")
echo "cure: env=${cure_env[*]:-} options=${cure_opts[*]:-}" | tee -a "$out/steps.log"
[ ${#cure_env[@]} -gt 0 ] || [ ${#cure_opts[@]} -gt 0 ] || { step "no cure in the report: stop"; exit 1; }

step "2. the cure, offline: expect every layer to pass (exit 0)"
env "${cure_env[@]}" timeout 300 $py -m gemmguard.cli selfcheck "$model" --json --policy fallback \
  "${cure_opts[@]}" "${engine[@]}" > "$out/cured.json" 2> "$out/cured.log"
echo "exit $?" | tee -a "$out/steps.log"

step "3. the cure, served: /gemmguard/ready, a completion, the report"
env "${cure_env[@]}" setsid $py -m gemmguard.cli serve "$model" --host 127.0.0.1 --port 8300 \
  --served-model-name moe "${cure_opts[@]}" "${engine[@]}" > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
  curl -sf -o /dev/null localhost:8300/gemmguard/ready && break
  kill -0 $pid 2>/dev/null || break; sleep 1
done
curl -s -w '\nHTTP %{http_code}\n' localhost:8300/gemmguard/ready > "$out/serve-ready.txt"
curl -s localhost:8300/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "moe", "prompt": "hello", "max_tokens": 8}' > "$out/serve-completion.json"
curl -s localhost:8300/gemmguard/v1/selfcheck > "$out/serve-selfcheck.json"
curl -s localhost:8300/metrics | grep -E "^gemmguard_(selfcheck|layer_kernel|kernel_fallback)" > "$out/serve-metrics.txt"
kill -TERM -- -$pid 2>/dev/null; sleep 5; kill -KILL -- -$pid 2>/dev/null
tail -2 "$out/serve-ready.txt" | tee -a "$out/steps.log"
step done
