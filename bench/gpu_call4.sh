#!/usr/bin/env bash
# Device call: kernel tests for the reworked GEMV / decode attention / rotary, then batch-1 latency
# with the phase breakdown and ncu per-kernel times.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_kernels_gpu.py -k "linear or add_norm or attention or rotary or forward" > "$OUT/kernel_tests.log" 2>&1
echo "kernel tests rc=$?"; tail -1 "$OUT/kernel_tests.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/kernel_tests.log" | head -5
timeout 100 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 --profile 2>&1 | grep "^|"
timeout 100 python3 bench/latency.py --model llama-3.1-8b --device cuda --iters 2 2>&1 | grep "^|"
timeout 200 bash bench/ncu_decode.sh qwen2.5-1.5b 8 2>&1 | grep -E "gemv|attention|rotary|nvjet|embedding|norm|argmax|fill" | head -14
