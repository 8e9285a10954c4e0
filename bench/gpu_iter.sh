#!/usr/bin/env bash
# A kernel iteration on the device: the kernel and graph tests, batch-1 latency, ncu per kernel.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_graphs_gpu.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/tests.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/tests.log" | head -5
timeout 90 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 2>&1 | grep "^|" | tail -1
timeout 200 bash bench/ncu_decode.sh qwen2.5-1.5b 8 2>&1 | grep -E "gemv|attention|rotary|nvjet|embedding|norm|argmax|fill" | head -10
