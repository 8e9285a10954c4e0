#!/usr/bin/env bash
# Second device call: the transformers peer on the same shapes as bench/gpu_session.sh, and rvllm serve
# start-up and footprint on the GPU (cold and warm kernel cache). Run after bench/gpu_session.sh.
# Needs .whl/tok (SmolLM2's tokenizer, exported on the dev machine: the device is offline).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
export RVLLM_BENCH_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RVLLM_CACHE=/tmp/cold-cache timeout 120 python3 bench/startup.py --runs 1 --append-results -- --model qwen2.5-1.5b --load-format dummy --device cuda --tokenizer .whl/tok 2>&1 | grep "^|" | tail -1
timeout 100 python3 bench/startup.py --runs 2 --append-results -- --model qwen2.5-1.5b --load-format dummy --device cuda --tokenizer .whl/tok 2>&1 | grep "^|" | tail -2
timeout 200 python3 bench/peer_transformers.py --model qwen2.5-1.5b 2>&1 | grep "^|" | tail -2
cp bench/RESULTS.md "$OUT/RESULTS.md"
