#!/usr/bin/env bash
# A kernel A/B on the device in one call: per-op times (bench/op_times.py) and batch-1 latency with
# the phase breakdown for this tree and for an older one (OLD, e.g. `git archive <commit>` unpacked
# into .whl/old, which travels with the wheels), then this tree's GPU tests.
# Usage: OLD=.whl/old bash bench/gpu_ab.sh [model]
set -u
MODEL=${1:-qwen2.5-1.5b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NEW=$PWD
for side in new old; do
  dir=$NEW; [ $side = old ] && dir=${OLD:-}
  [ -d "$dir" ] || continue
  echo "== $side ($dir)"
  (cd "$dir" && export PYTHONPATH=/tmp/site:$dir &&
   timeout 120 python3 bench/op_times.py --model "$MODEL" --batch 1 --context 128 2>&1 | grep -E "^\||Error|error" | tail -12 &&
   timeout 90 python3 bench/latency.py --model "$MODEL" --device cuda --iters 3 --profile 2>&1 | grep -E "^\||Error" | tail -14)
done
export PYTHONPATH=/tmp/site:$NEW
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
    tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
