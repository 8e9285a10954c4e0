#!/usr/bin/env bash
# A kernel A/B on the device in one call: batch-1 latency (and, with OP_TIMES=1, per-op times from
# bench/op_times.py) for this tree and for an older one (OLD, e.g. `git archive <commit>` unpacked
# into .whl/old, which travels with the wheels), alternating trees per model so drift falls on both;
# then this tree's GPU tests unless SKIP_TESTS=1.
# Usage: OLD=.whl/old MODELS="qwen2.5-1.5b llama-3.1-8b" bash bench/gpu_ab.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NEW=$PWD
for model in ${MODELS:-qwen2.5-1.5b}; do
  for side in old new; do
    dir=$NEW; [ $side = old ] && dir=${OLD:-}
    [ -d "$dir" ] || continue
    echo "== $side ($dir) $model"
    (cd "$dir" && export PYTHONPATH=/tmp/site:$dir &&
     if [ -n "${OP_TIMES:-}" ]; then
       timeout 120 python3 bench/op_times.py --model "$model" --batch 1 --context 128 2>&1 | grep -E "^\||Error|error" | tail -12
     fi
     timeout 150 python3 bench/latency.py --model "$model" --device cuda --iters 3 ${PROFILE:+--profile} 2>&1 \
       | grep -E "^\||Error|error" | tail -${LINES_SHOWN:-3})
  done
done
export PYTHONPATH=/tmp/site:$NEW
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
      tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
fi
