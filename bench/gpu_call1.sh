#!/usr/bin/env bash
# Device call: the small-batch GEMV kernels. Their tests, then batch-1 latency with them off and on
# (RVLLM_GEMV_MAX_ROWS=0 = cuBLAS), 8b batch 1, throughput 256, and the transformers peer.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
export RVLLM_BENCH_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_kernels_gpu.py -k "linear or add_norm or forward" > "$OUT/kernel_tests.log" 2>&1
echo "kernel tests rc=$?"; tail -3 "$OUT/kernel_tests.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/kernel_tests.log" | head -5
timeout 200 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_model_gpu.py tests/test_graphs_gpu.py > "$OUT/model_tests.log" 2>&1
echo "model tests rc=$?"; tail -3 "$OUT/model_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/model_tests.log" | head -5
for rows in 0 8; do
  echo "RVLLM_GEMV_MAX_ROWS=$rows"
  RVLLM_GEMV_MAX_ROWS=$rows timeout 100 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 2>&1 | tail -1
done
timeout 120 python3 bench/latency.py --model llama-3.1-8b --device cuda --iters 2 2>&1 | tail -1
timeout 150 python3 bench/throughput.py --model qwen2.5-1.5b --device cuda --num-prompts 256 2>&1 | tail -1
timeout 240 python3 bench/peer_transformers.py --model qwen2.5-1.5b 2>&1 | tail -4
