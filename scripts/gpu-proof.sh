#!/usr/bin/env bash
# Issue 8: the inventory and the self-check against vLLM's real CUDA kernels, on the lent H100.
# Runs on the device machine from the repo root, after ../shared/gpu/setup-on-device.sh has
# unpacked vLLM 0.26.0 into $HOME/gg-site. Every result goes under $OUT (see docs/gpu-proof.md).
#   PY=python3 OUT=/tmp/out scripts/gpu-proof.sh
set -uo pipefail
out=${OUT:?set OUT to a folder for the results}
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
export PYTHONPATH=$site:$PWD/server
# What the device recipe asks for (../shared/gpu/README.md): no FlashInfer sampler in the bundle,
# and no 5-minute DeepGEMM warm-up for a 2-layer model.
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip HF_HUB_OFFLINE=1
engine=(--enforce-eager --gpu-memory-utilization 0.3 --max-model-len 1024)

# vLLM finds plugins by entry points, which need package metadata; the device has no pip index,
# so gemmguard's dist-info is written beside the bundle (the same entry points as pyproject.toml).
meta=$site/gemmguard-0.1.0.dist-info
if [ ! -f "$meta/entry_points.txt" ]; then
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
  printf '[vllm.general_plugins]\ngemmguard = gemmguard.plugin:register\n\n[vllm.endpoint_plugins]\ngemmguard_api = gemmguard.endpoints:GemmguardEndpoints\n' > "$meta/entry_points.txt"
fi

step() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
step versions
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
} > "$out/versions.txt" 2>&1
model=/tmp/gg-demo-fp8
$py -m gemmguard.cli demo-model --scheme fp8-block --out $model > /dev/null

step "self-check offline, default kernels (DeepGEMM path)"
timeout 300 $py -m gemmguard.cli selfcheck $model --json "${engine[@]}" \
  > "$out/selfcheck-default.json" 2> "$out/selfcheck-default.log"; echo "rc=$?" >> "$out/steps.log"

step "inventory offline, VLLM_USE_DEEP_GEMM=0 (CUTLASS path)"
VLLM_USE_DEEP_GEMM=0 timeout 200 $py -m gemmguard.cli kernels $model --json "${engine[@]}" \
  > "$out/kernels-no-deepgemm.json" 2> "$out/kernels-no-deepgemm.log"; echo "rc=$?" >> "$out/steps.log"

step "self-check offline, VLLM_USE_DEEP_GEMM=0 (CUTLASS path)"
VLLM_USE_DEEP_GEMM=0 timeout 200 $py -m gemmguard.cli selfcheck $model --json "${engine[@]}" \
  > "$out/selfcheck-no-deepgemm.json" 2> "$out/selfcheck-no-deepgemm.log"; echo "rc=$?" >> "$out/steps.log"

step "gemmguard serve, default policy (fallback)"
$py -m gemmguard.cli serve $model --port 8000 "${engine[@]}" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  curl -sf localhost:8000/gemmguard/ready > "$out/ready.json" && break
  kill -0 $server 2>/dev/null || break
  sleep 1
done
step "server answered ready (or gave up)"
curl -s localhost:8000/gemmguard/v1/selfcheck > "$out/serve-selfcheck.json"
curl -s localhost:8000/gemmguard/v1/kernels > "$out/serve-kernels.json"
curl -s localhost:8000/gemmguard/v1/build > "$out/serve-build.json"
curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "'$model'", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}' \
  > "$out/serve-chat.json"
curl -s localhost:8000/metrics | grep '^gemmguard_' > "$out/serve-metrics.txt"
kill $server 2>/dev/null; wait $server
step done
# The device returns a limited number of files: pack them into one.
tar czf /tmp/gpu-proof.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/gpu-proof.tgz "$out/"
