"""gemm_wgmma.cu against cuBLAS at a model's decode products, per step size (rows).

For each product (qkv, o, gate_up, down) and row count: cuBLAS (what the backend runs otherwise),
the wgmma kernel as the wrapper launches it, in us a call
(CUDA graphs of many calls, weights rotating through copies so that each call reads them from
DRAM, as op_times.py does); --sweep adds each token tile at its best split of K. The relative difference of the wgmma result from cuBLAS's is printed
too (both fp32-accumulated; a wrong kernel shows as ~1).

    python bench/gemm_wgmma.py --model qwen2.5-1.5b --rows 32,64,128,256 [--sweep]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.op_times import _L2_BYTES, _time_graph  # noqa: E402

SPLITS = (1, 2, 3, 4, 6, 8, 11, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rows", default="16,32,64,128,256")
    ap.add_argument("--sweep", action="store_true", help="also time each token tile (build) at each split in SPLITS")
    args = ap.parse_args()
    import cupy as cp

    from rvllm.backend.cuda import CudaBackend
    from rvllm.backend.cuda_wgmma import WG_BK, WG_BM, WGMMA_BUILDS, choose_splits, token_tile
    from rvllm.model.config import preset_spec

    s = preset_spec(args.model)
    wg = CudaBackend("bfloat16", gemv_max_rows=0, wgmma_rows=(1, 4096), gemv_tc_square_max_rows=0,
                    skinny_rows=(0, 0))
    blas = CudaBackend("bfloat16", gemv_max_rows=0, wgmma_rows=(0, 0), gemv_tc_square_max_rows=0,
                      skinny_rows=(0, 0))
    blas.stream = wg.stream
    if wg.wgmma is None:
        sys.exit("gemm_wgmma.cu needs a GPU of compute capability 9.0")
    h, inter = s.hidden_size, s.intermediate_size
    shapes = {"qkv": (s.q_size + 2 * s.kv_size, h), "o": (h, s.q_size), "gate_up": (2 * inter, h), "down": (h, inter)}
    seed = iter(range(1, 10_000))
    print(f"| product ({args.model}, {wg.device_name}) | rows | MB | cuBLAS us | wgmma us | rel. diff "
          f"| each token tile at its best split (--sweep) |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, k) in shapes.items():
        nbytes = 2 * n * k
        mats = [wg.dummy_weight((n, k), 0.02, next(seed)) for _ in range(max(1, min(64, -(-4 * _L2_BYTES // nbytes))))]
        for rows in (int(r) for r in args.rows.split(",")):
            x = wg.dummy_weight((rows, k), 1.0, next(seed))
            reps = max(20, 2 * len(mats))
            t_blas = _time_graph(cp, wg.stream, lambda i: blas.linear(x, mats[i % len(mats)]), reps, wg.graph_capture)
            t_wg = _time_graph(cp, wg.stream, lambda i: wg.linear(x, mats[i % len(mats)]), reps, wg.graph_capture)
            ref = wg.to_host(blas.linear(x, mats[0])).astype(np.float64)
            got = wg.to_host(wg.linear(x, mats[0])).astype(np.float64)
            diff = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
            bn, _ = token_tile(rows)
            auto = choose_splits((n // WG_BM) * -(-rows // bn), k // WG_BK, wg.num_sms)
            tail = ""
            if args.sweep:  # each token tile at each split count; the best of each tile
                best = []
                for bn_try, _ in WGMMA_BUILDS:
                    wg.wgmma.tile_override = bn_try
                    times = []
                    for sp in SPLITS:
                        wg.wgmma.splits_override = sp
                        times.append((_time_graph(cp, wg.stream, lambda i: wg.linear(x, mats[i % len(mats)]), reps,
                                                  wg.graph_capture), sp))
                    best.append(f"{bn_try}: {min(times)[0]:.1f} (s={min(times)[1]})")
                wg.wgmma.tile_override = wg.wgmma.splits_override = None
                tail = "; ".join(best)
            print(f"| {name} | {rows} | {nbytes / 1e6:.1f} | {t_blas:.1f} | {t_wg:.1f} (bn {bn}, {auto} splits) | {diff:.1e} "
                  f"| {tail} |",
                  flush=True)


if __name__ == "__main__":
    main()
