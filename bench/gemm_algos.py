"""cuBLAS algorithm choice at the model's GEMM shapes: what cublasGemmEx runs (the backend's path)
against each algorithm cuBLASLt's heuristic proposes, timed in CUDA graphs as bench/op_times.py
times ops (weights rotating through copies so small-row products read DRAM).

    python bench/gemm_algos.py --model qwen2.5-1.5b --rows 16,64,128,256,512,8192
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.op_times import _L2_BYTES, _time_graph  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rows", default="16,64,128,256,512,8192", help="token rows per product, comma-separated")
    ap.add_argument("--algos", type=int, default=16, help="how many heuristic algorithms to time")
    args = ap.parse_args()
    import cupy as cp

    from bench import cublaslt as lt
    from rvllm.backend.cuda import CudaBackend
    from rvllm.model.config import preset_spec

    s = preset_spec(args.model)
    b = CudaBackend("bfloat16", gemv_max_rows=0, gemv_tc_square_max_rows=0, skinny_rows=(0, 0))
    h, inter = s.hidden_size, s.intermediate_size
    seed = iter(range(1, 10_000))
    ws_bytes = 32 << 20
    workspace = cp.empty(ws_bytes, dtype=np.uint8)
    bf16 = 14  # CUDA_R_16BF

    def copies(n, k):
        nbytes = 2 * n * k
        return [b.dummy_weight((n, k), 0.02, next(seed)) for _ in range(max(1, min(64, -(-4 * _L2_BYTES // nbytes))))]

    shapes = [("qkv", s.q_size + 2 * s.kv_size, h), ("o", h, s.q_size), ("gate_up", 2 * inter, h),
              ("down", h, inter), ("logits", s.vocab_size, h)]
    print(f"| {args.model} ({b.device_name}) | rows | N | K | gemmEx us | Lt first us | Lt best us | best algo "
          "(id/tile/splitK/stages) | best TFLOP/s | best GB/s | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k in shapes:
        weights = copies(n, k)
        for t in (int(r) for r in args.rows.split(",")):
            if name == "logits" and t > 512:
                continue  # logits are computed for the last token of each request only
            out_type, out_dtype = (0, np.float32) if name == "logits" else (bf16, b.compute_dtype)
            x = b.dummy_weight((t, k), 1.0, next(seed))
            out = cp.empty((t, n), dtype=out_dtype)
            ref = cp.empty((t, n), dtype=out_dtype)
            reps = 20 if t <= 512 else 3
            beta0 = b._beta0

            def gemm_ex(i, dst=out):
                b._gemm(x, weights[i % len(weights)], dst, out_type, beta0)

            t_ex = _time_graph(cp, b.stream, gemm_ex, max(reps, 2 * len(weights)) if t <= 512 else reps, b.graph_capture)
            plan = lt.LinearPlan(t, n, k, k, bf16, out_type)
            found = plan.heuristics(args.algos, ws_bytes)
            times = []
            for res in found:
                algo = res.algo

                def run(i, algo=algo):
                    plan.run(algo, weights[i % len(weights)].data.ptr, x.data.ptr, out.data.ptr,
                             workspace.data.ptr, ws_bytes, b.stream.ptr)
                try:
                    times.append(_time_graph(cp, b.stream, run, max(reps, 2 * len(weights)) if t <= 512 else reps,
                                             b.graph_capture))
                except RuntimeError as e:  # an algorithm the heuristic lists may still refuse the call
                    times.append(float("inf"))
                    print(f"<!-- {name} rows {t}: algo {lt.describe(algo)} failed: {e} -->")
            if not times:
                print(f"| {name} | {t} | {n} | {k} | {t_ex:.1f} | none | | | | | |")
                continue
            best = int(np.argmin(times))
            with b.stream:
                gemm_ex(0, ref)
                plan.run(found[best].algo, weights[0].data.ptr, x.data.ptr, out.data.ptr, workspace.data.ptr,
                         ws_bytes, b.stream.ptr)
                b.stream.synchronize()
            r, o = ref.astype(np.float32), out.astype(np.float32)
            diff = float(cp.abs(r - o).max() / max(float(cp.abs(r).max()), 1e-30))
            tb = times[best]
            print(f"| {name} | {t} | {n} | {k} | {t_ex:.1f} | {times[0]:.1f} | {tb:.1f} | #{best} "
                  f"{lt.describe(found[best].algo)} | {2 * t * n * k / tb / 1e6:.0f} | "
                  f"{2 * n * k / tb / 1e3:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
