#!/usr/bin/env bash
# Per-kernel GPU time of batch-1 decode (CUDA-graph nodes profiled one by one by ncu; ncu locks the
# clocks to base, so absolute times read high). Usage: bash bench/ncu_decode.sh [model] [output-len]
set -u
MODEL=${1:-qwen2.5-1.5b}
N=${2:-12}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ncu --graph-profiling node --metrics gpu__time_duration.sum --csv --print-units base \
    python3 bench/latency.py --model "$MODEL" --device cuda --iters 1 --output-len "$N" --input-len 32 \
    > "$OUT/ncu_decode.csv" 2> "$OUT/ncu_decode.err"
python3 - "$OUT/ncu_decode.csv" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]
iname, ival, igrid = head.index("Kernel Name"), head.index("Metric Value"), head.index("Grid Size")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[1:]:
    try:
        v = float(r[ival].replace(",", ""))
    except ValueError:
        continue
    key = (r[iname][:60], r[igrid])
    tot[key] += v; cnt[key] += 1
print("| kernel | grid | launches | mean us | total ms |")
for key, t in tot.most_common(25):
    print(f"| {key[0]} | {key[1]} | {cnt[key]} | {t / cnt[key] / 1e3:.1f} | {t / 1e6:.2f} |")
PY
