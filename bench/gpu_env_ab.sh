#!/usr/bin/env bash
# A/B of one environment variable in one device call (same card, same warm machine): batch-1 latency
# per model and 256-way throughput on qwen2.5-1.5b, once per value, alternating values so drift
# falls on both sides; then this tree's GPU tests with the variable unset.
# Usage: AB_VAR=RVLLM_PDL AB_VALUES="0 1" MODELS="qwen2.5-1.5b llama-3.1-8b" bash bench/gpu_env_ab.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
VAR=${AB_VAR:?set AB_VAR}
for model in ${MODELS:-qwen2.5-1.5b}; do
  for round in ${ROUNDS:-1}; do
    for value in ${AB_VALUES:-0 1}; do
      echo "== $VAR=$value $model latency (round $round)"
      env "$VAR=$value" timeout 150 python3 bench/latency.py --model "$model" --device cuda --iters 3 ${PROFILE:+--profile} 2>&1 \
        | grep -E "^\||Error|error" | tail -${LINES_SHOWN:-4}
    done
  done
done
if [ -z "${SKIP_THROUGHPUT:-}" ]; then
  for value in ${AB_VALUES:-0 1}; do
    echo "== $VAR=$value qwen2.5-1.5b throughput 256 x 128/128"
    env "$VAR=$value" timeout 150 python3 bench/throughput.py --model qwen2.5-1.5b --device cuda --num-prompts 256 2>&1 \
      | grep -E "^\||Error|error" | tail -4
  done
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
      tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
fi
