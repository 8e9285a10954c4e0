"""The products of a model at token-row counts where cuBLAS runs them, as one cublasGemmEx against
backend/cuda_ksplit.py's K-slices (S cuBLAS products of K / S columns into fp32 partials, then the
fixed-order reduce kernel) at each S, timed in CUDA graphs as bench/op_times.py times ops (weights
rotating through copies, so each call reads them from DRAM). Marks the S that cuda_ksplit.k_slices
picks, to check its rule on a card.

    python bench/gemm_k_slices.py --model qwen2.5-1.5b --rows 3,8,16,64,128,256,512
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
    ap.add_argument("--rows", default="3,8,16,64,128,256,512", help="token rows per product, comma-separated")
    ap.add_argument("--products", default="qkv,o,gate_up,down")
    args = ap.parse_args()
    import cupy as cp

    from rvllm.backend import cuda_ksplit
    from rvllm.backend.cuda import CudaBackend
    from rvllm.model.config import preset_spec

    s = preset_spec(args.model)
    # every row count on cuBLAS
    b = CudaBackend("bfloat16", gemv_max_rows=0, wgmma_rows=(0, 0), gemv_tc_square_max_rows=0, skinny_rows=(0, 0))
    rule = cuda_ksplit.k_slices
    seed = iter(range(1, 10_000))
    shapes = {"qkv": (s.q_size + 2 * s.kv_size, s.hidden_size), "o": (s.hidden_size, s.q_size),
              "gate_up": (2 * s.intermediate_size, s.hidden_size), "down": (s.hidden_size, s.intermediate_size)}
    print(f"{args.model} on {b.device_name}: us a product (graph-timed); * marks k_slices' choice; "
          "max |difference| to gemmEx relative to its largest output")
    print("| product | N x K | rows | gemmEx | S = 2 | S = 4 | S = 8 | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.products.split(","):
        n, k = shapes[name]
        copies = max(1, min(64, -(-4 * _L2_BYTES // (2 * n * k))))
        weights = [b.dummy_weight((n, k), 0.02, next(seed)) for _ in range(copies)]
        for t in (int(r) for r in args.rows.split(",")):
            x = b.dummy_weight((t, k), 1.0, next(seed))
            picked = rule(t, n, k, b.num_sms)
            cells, outs = [], {}
            for forced in (1, 2, 4, 8):
                if forced > 1 and (k % (8 * forced)):
                    cells.append("-")
                    continue
                cuda_ksplit.k_slices = lambda *a, f=forced: f
                try:
                    us = _time_graph(cp, b.stream, lambda i: b.linear(x, weights[i % copies]),
                                     max(20, 2 * copies), b.graph_capture)
                    with b.stream:
                        outs[forced] = b.to_host(b.linear(x, weights[0]))  # float32
                finally:
                    cuda_ksplit.k_slices = rule
                cells.append(f"{us:.2f}{' *' if forced == picked else ''}")
            ref = outs[1]
            diff = max(float(np.abs(o - ref).max()) for o in outs.values()) / max(float(np.abs(ref).max()), 1e-30)
            print(f"| {name} | {n} x {k} | {t} | " + " | ".join(cells) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
