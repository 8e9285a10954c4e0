"""skinny_gemm.cu (3-16-row steps by default on sm_90) per product of a preset's decode layer, with the
wrapper's grid and by blocks a cluster or clusters a grid, against cuBLAS with its norm and SiLU
kernels, us a call:
each op captured 40 times into a CUDA graph and timed as bench/op_times.py does (median of 10
replays), the weights rotating through ~200 MB of copies so that every call reads DRAM. sm_90 only.

    python bench/skinny_gemm.py --model qwen2.5-1.5b --rows 8 --sizes 2 4 8 --clusters 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.op_times import _time_graph  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rows", type=int, default=8, help="token rows of the step (3-16)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[], choices=[2, 4, 8], help="blocks a cluster to time (2, 4, 8), each with "
                    "as many clusters as the wrapper would launch of it")
    ap.add_argument("--clusters", type=int, nargs="*", default=[], help="clusters a grid to time, of the wrapper's size")
    args = ap.parse_args()

    import cupy as cp

    from rvllm.backend.cuda import CudaBackend
    from rvllm.model.config import preset_spec

    s, rows = preset_spec(args.model), args.rows
    b = CudaBackend("bfloat16", skinny_rows=(3, 16))
    if b.skinny is None:
        sys.exit("skinny_gemm.cu runs on compute capability 9.0 only")
    blas = CudaBackend("bfloat16", gemv_max_rows=0, gemv_tc_square_max_rows=0, skinny_rows=(0, 0))
    blas.stream = b.stream
    h, qkv_out, inter = s.hidden_size, s.q_size + 2 * s.kv_size, s.intermediate_size
    seed = iter(range(1, 10_000))
    w = lambda *shape: b.dummy_weight(shape, 0.02, next(seed))  # noqa: E731

    def copies(*shape):
        return [w(*shape) for _ in range(max(1, min(32, -(-(200 << 20) // (2 * int(np.prod(shape)))))))]

    bias = w(qkv_out) if s.attention_bias else None
    x, res, norm_w = w(rows, h), w(rows, h), w(h)
    xq, xi = w(rows, s.q_size), w(rows, inter)
    eps = 1e-6
    products = (  # (name, weight copies, op of a backend and a weight)
        ("add_norm + qkv", copies(qkv_out, h), lambda be, m: be.add_norm_linear(x, res, norm_w, eps, m, bias)),
        ("o_proj", copies(h, s.q_size), lambda be, m: be.linear(xq, m)),
        ("add_norm + gate_up + SiLU", copies(2 * inter, h),
         lambda be, m: be.add_norm_linear(x, res, norm_w, eps, m, None, "silu_and_mul")),
        ("down", copies(h, inter), lambda be, m: be.linear(xi, m)),
    )
    grids = [(None, None)] + [(s, None) for s in args.sizes] + [(None, c) for c in args.clusters]
    print(f"{args.model}, {rows} rows, us a call")
    print("| product | cuBLAS path | " + " | ".join(
        "skinny, the wrapper's grid" if g == (None, None) else f"skinny, {g[0]}-block clusters" if g[0]
        else f"skinny, {g[1]} clusters" for g in grids) + " |")
    print("|---|---|" + "---|" * len(grids))
    for name, mats, op in products:
        def timed(be):
            return _time_graph(cp, b.stream, lambda i: op(be, mats[i % len(mats)]), 40, b.graph_capture)
        cells = [timed(blas)]
        for size, clusters in grids:
            b.skinny.cluster_size_override, b.skinny.clusters_override = size, clusters
            cells.append(timed(b))
        b.skinny.cluster_size_override = b.skinny.clusters_override = None
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
