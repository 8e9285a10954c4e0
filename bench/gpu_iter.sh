#!/usr/bin/env bash
# A kernel iteration on the device: per-op times at batch 1 and 256, batch-1 latency and 256-way
# throughput with the phase breakdown, then the GPU tests (log in $OUT/gpu_tests.log).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-qwen2.5-1.5b}
timeout 120 python3 bench/op_times.py --model "$MODEL" --batch 1 --context 128 2>&1 | grep -E "^\||Error" | tail -10
timeout 120 python3 bench/op_times.py --model "$MODEL" --batch 256 --context 192 2>&1 | grep -E "^\||Error" | tail -10
timeout 90 python3 bench/latency.py --model "$MODEL" --device cuda --iters 3 --profile 2>&1 | grep -E "^\||Error" | tail -13
timeout 120 python3 bench/throughput.py --model "$MODEL" --device cuda --num-prompts 256 --profile 2>&1 | grep -E "^\||Error" | tail -13
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
    tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20
