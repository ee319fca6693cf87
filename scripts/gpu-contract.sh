#!/usr/bin/env bash
# Issue 17: gemmguard's vLLM adapter contract tests against the vLLM of the lent H200 (0.26), and the
# self-check's time at load on an 8B-shaped FP8 model (after the device-side references).
# Runs on the device from the repo root, after ../shared/gpu's setup put vLLM 0.26.0 in $HOME/gg-site;
# the exact calls are in docs/vllm-0.26-contract.md. Results go under $OUT.
#   OUT=/tmp/out scripts/gpu-contract.sh contract     # the adapter's contract tests
#   OUT=/tmp/out scripts/gpu-contract.sh selfcheck    # 8B dense (beside plain vLLM) and Qwen3-MoE
#   OUT=/tmp/out scripts/gpu-contract.sh replaced     # 8B dense on vLLM's default DeepGEMM, policy
#                                                     # fallback: every layer replaced (issue 24's
#                                                     # check time), twice (the 2nd with DeepGEMM's JIT warm)
# pytest is not in the bundle: its wheels travel in .gpu/wheels (carry it), installed beside it.
set -uo pipefail
what=${1:?usage: gpu-contract.sh contract|selfcheck|replaced}
out=${OUT:?set OUT to a folder for the results}
py=${PY:-python3}
site=${GG_SITE:-$HOME/gg-site}
work=${GG_CONTRACT_WORK:-/tmp/gg-contract}
mkdir -p "$work" "$out"
export PYTHONPATH=$HOME/gg-test:$site:$PWD/server:$PWD
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DEEP_GEMM_WARMUP=skip HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$what" = contract ]; then
  $py -m pip install -q --no-index --no-deps --target "$HOME/gg-test" .gpu/wheels/*.whl
  # -p no:warnings: vLLM 0.26's own deprecation warnings are not what these tests hold it to.
  GEMMGUARD_CONTRACT_OUT=$out/facts timeout 540 $py -m pytest -p no:warnings -rA \
    --junitxml "$out/contract.xml" \
    tests/test_vllm_adapter.py tests/test_vllm_adapter_moe.py tests/test_vllm_adapter_serve_args.py \
    tests/test_vllm_adapter_fixes.py tests/test_vllm_adapter_seam.py tests/test_e2e_vllm_adapter_layer.py > "$out/contract.log" 2>&1
  echo "pytest exit $?" >> "$out/contract.log"
  tail -40 "$out/contract.log"
  exit 0
fi

# The self-check runs in the engine process, which finds gemmguard by its entry points: the device
# has no pip index, so gemmguard's dist-info is written beside the bundle (as scripts/gpu-bench.sh).
meta=$site/gemmguard-0.1.0.dist-info
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: gemmguard\nVersion: 0.1.0\n' > "$meta/METADATA"
printf '[vllm.general_plugins]\ngemmguard = gemmguard.plugin:register\n' > "$meta/entry_points.txt"
# DeepGEMM off: its kernel fails the check on Hopper and would be replaced (JIT and replacement
# time); with CUTLASS chosen the check's own time is what is measured, as in docs/benchmarks-gpu.md.
export VLLM_USE_DEEP_GEMM=0
engine=(--enforce-eager --max-model-len 2048 --gpu-memory-utilization 0.5)
policy=()
if [ "$what" = replaced ]; then  # DeepGEMM on (vLLM's default), every layer replaced in place
  export VLLM_USE_DEEP_GEMM=1
  policy=(--policy fallback)
fi
checkpoint() {  # NAME KIND [ARGS]: a checkpoint made on the GPU
  [ -d "$work/$1" ] || $py scripts/gpu_checkpoints.py "$2" "$work/$1" "${@:3}" > "$out/$1-make.log" 2>&1
}
elapsed() { $py -c "import time; print(round(time.time() - $1, 1))"; }
gemmguard() {  # NAME RUN: gemmguard's offline self-check (vLLM loads the model, the check runs)
  local t=$(date +%s.%N)
  timeout 300 $py -m gemmguard.cli selfcheck "$work/$1" --json "${policy[@]}" "${engine[@]}" \
    > "$out/$1-selfcheck-$2.json" 2> "$out/$1-selfcheck-$2.log"
  echo "$1 gemmguard run $2: exit $?, wall $(elapsed $t) s" | tee -a "$out/steps.log"
  grep -hE "gemmguard self-check|Model loading took" "$out/$1-selfcheck-$2.log" | cut -c1-400
}
plain() {  # NAME RUN: the same load in plain vLLM (no plugin), for the load time beside it
  local t=$(date +%s.%N)
  VLLM_PLUGINS=none timeout 240 $py -c "import sys; from vllm import LLM
LLM(sys.argv[1], enforce_eager=True, max_model_len=2048, gpu_memory_utilization=0.5)" \
    "$work/$1" > "$out/$1-plain-$2.log" 2>&1
  echo "$1 plain run $2: exit $?, wall $(elapsed $t) s" | tee -a "$out/steps.log"
  grep -hE "Model loading took" "$out/$1-plain-$2.log" | cut -c1-300
}
checkpoint llama8b llama8b
if [ "$what" = replaced ]; then
  gemmguard llama8b replaced-1; gemmguard llama8b replaced-2
  exit 0
fi
gemmguard llama8b 1; plain llama8b 1; plain llama8b 2; gemmguard llama8b 2  # ABBA
checkpoint qwen3moe qwen3moe
gemmguard qwen3moe 1
checkpoint qwen3moe-router-mismatch qwen3moe --router-excluded-by-short-name
gemmguard qwen3moe-router-mismatch 1
