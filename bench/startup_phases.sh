#!/usr/bin/env bash
# Where a warm `rvllm serve` start goes (device machine): CuPy import, CUDA context and cuBLAS
# timed alone, then three serve starts with each log line stamped with seconds since launch.
# Needs .whl/tok (the offline device has no tokenizer download). Usage: bash bench/startup_phases.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD RVLLM_CACHE=/tmp/rvllm-cache PYTHONUNBUFFERED=1
python3 -c "
import time; t=time.time(); import cupy; t1=time.time(); cupy.zeros(1).sum(); t2=time.time()
cupy.cuda.device.get_cublas_handle(); t3=time.time()
print(f'import cupy {t1-t:.2f} s, CUDA context + first kernel {t2-t1:.2f} s, cuBLAS handle {t3-t2:.2f} s')"
for run in 1 2 3; do
  T0=$(date +%s.%N)
  python3 -m rvllm serve --model qwen2.5-1.5b --load-format dummy --device cuda --tokenizer .whl/tok --port 8012 --log-level info 2>&1 \
    | python3 -u -c 'import sys,time; t0=float(sys.argv[1]); [print(f"{time.time()-t0:6.2f} {l}", end="") for l in sys.stdin]' $T0 > /tmp/serve_$run.log &
  PIPE=$!
  for _ in $(seq 800); do curl -sf http://127.0.0.1:8012/health > /dev/null && break; sleep 0.05; done
  echo "run $run: health after $(python3 -c "import time; print(round(time.time()-$T0, 2))") s"
  pkill -f "rvllm serve --model qwen2.5-1.5b"
  wait $PIPE  # the pipe closes when the engine process has exited too (it holds the KV cache's GPU memory)
  cut -c1-160 /tmp/serve_$run.log | grep -v "Received request" | head -20
done
