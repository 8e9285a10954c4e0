#!/usr/bin/env bash
# Second device call: rvllm and the transformers peer side by side in one call (qwen2.5-1.5b, batch 1
# and 256 x 128/128), `rvllm serve` start-up and footprint on the GPU (cold and warm kernel cache),
# and llama-3.1-8b through `rvllm serve` + bench/serve.py at concurrency 16, 1024 in / 128 out.
# Needs .whl/tok (SmolLM2's tokenizer, exported on the dev machine: the device is offline).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
export RVLLM_BENCH_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "${PROBE:-}" ] && for c in cublas cupy; do compute-sanitizer --tool initcheck python3 bench/initcheck_probe.py $c 2>&1 | grep -E "ERROR SUMMARY|probe" | head -2; done
timeout 90 python3 bench/latency.py --model qwen2.5-1.5b --device cuda --iters 3 --append-results 2>&1 | grep "^|" | tail -1
timeout 100 python3 bench/throughput.py --model qwen2.5-1.5b --device cuda --num-prompts 256 --append-results 2>&1 | grep "^|" | tail -1
timeout 240 python3 bench/peer_transformers.py --model qwen2.5-1.5b 2>&1 | grep "^|" | tail -2
RVLLM_CACHE=/tmp/cold-cache timeout 120 python3 bench/startup.py --runs 1 --append-results -- --model qwen2.5-1.5b --load-format dummy --device cuda --tokenizer .whl/tok 2>&1 | grep "^|" | tail -1
timeout 100 python3 bench/startup.py --runs 2 --append-results -- --model qwen2.5-1.5b --load-format dummy --device cuda --tokenizer .whl/tok 2>&1 | grep "^|" | tail -2
timeout 60 python3 bench/rss_stages.py 2>&1 | grep "^|" > "$OUT/rss_stages.md"; cat "$OUT/rss_stages.md"
# llama-3.1-8b served (the tokenizer is SmolLM2's: ids past its vocabulary detokenize to nothing).
python3 -m rvllm serve --model llama-3.1-8b --load-format dummy --device cuda --tokenizer .whl/tok --max-model-len 4096 \
    --port 8011 --log-level warning > "$OUT/serve8b.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:8011/health > /dev/null && break; sleep 1; done
timeout 150 python3 bench/serve.py --base-url http://127.0.0.1:8011 --num-prompts 64 --random-input-len 1024 \
    --random-output-len 128 --max-concurrency 16 --label "rvllm serve llama-3.1-8b" --append-results 2>&1 | grep "^|" | tail -3
kill $SERVER; wait $SERVER 2>/dev/null
cp bench/RESULTS.md "$OUT/RESULTS.md"
