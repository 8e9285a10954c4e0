#!/usr/bin/env bash
# One device call: the GPU tests, compute-sanitizer over every kernel, the card's copy bandwidth (the
# batch-1 roofline), batch-1 latency and throughput with async scheduling on and off (with the
# phase breakdown), then the 7b/8b presets at batch 1 and qwen2.5-7b at 128 concurrent. Tables append to bench/RESULTS.md, which is copied to $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
export RVLLM_BENCH_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_gpu.py tests/test_model_gpu.py \
    tests/test_graphs_gpu.py tests/test_sampler_gpu.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -1 "$OUT/gpu_tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head
SKIP_PYTEST=1 timeout 200 bash bench/gpu_kernel_check.sh 2>&1 | tail -8
python3 - <<'PY'
import cupy as cp
n = 1 << 30
a = cp.empty(n, dtype=cp.uint8); b = cp.empty_like(a)
for _ in range(3): b[...] = a
s, e = cp.cuda.Event(), cp.cuda.Event()
s.record()
for _ in range(10): b[...] = a
e.record(); e.synchronize()
ms = cp.cuda.get_elapsed_time(s, e) / 10
print(f"copy bandwidth (read+write): {2 * n / ms / 1e6:.0f} GB/s")
PY
# ASYNC="--no-async-scheduling --async-scheduling" runs both modes (the before/after of async scheduling).
for a in ${ASYNC:---async-scheduling}; do
  timeout 90 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 $a --profile --append-results 2>&1 | grep "^|" | head -3
  timeout 100 python3 bench/throughput.py --model qwen2.5-1.5b --device cuda --num-prompts 256 $a --profile --append-results 2>&1 | grep "^|" | head -3
done
timeout 90 python3 bench/latency.py --model qwen2.5-7b --device cuda --iters 2 --append-results 2>&1 | grep "^|" | tail -1
timeout 90 python3 bench/latency.py --model llama-3.1-8b --device cuda --iters 2 --append-results 2>&1 | grep "^|" | tail -1
timeout 120 python3 bench/throughput.py --model qwen2.5-7b --device cuda --num-prompts 128 --max-num-seqs 128 --append-results 2>&1 | grep "^|" | tail -1
cp bench/RESULTS.md "$OUT/RESULTS.md"
