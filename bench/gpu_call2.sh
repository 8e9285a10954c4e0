#!/usr/bin/env bash
# Device call: GPU tests after async scheduling + GEMV; latency and throughput with async on/off and
# the phase breakdown; 8b batch 1.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
export RVLLM_BENCH_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
    tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head
for a in --no-async-scheduling --async-scheduling; do
  timeout 100 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 $a --profile --append-results 2>&1 | grep "^|"
done
for a in --no-async-scheduling --async-scheduling; do
  timeout 120 python3 bench/throughput.py --model qwen2.5-1.5b --device cuda --num-prompts 256 $a --profile --append-results 2>&1 | grep "^|"
done
timeout 100 python3 bench/latency.py --model llama-3.1-8b --device cuda --iters 2 --append-results 2>&1 | grep "^|"
cp bench/RESULTS.md "$OUT/RESULTS.md"
