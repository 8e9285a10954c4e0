"""What one small-batch product costs beyond its bytes: a model's decode products at 1, 2, 4 and 8
times their output rows, timed as op_times.py times them (CUDA graphs of many calls, weights
rotating through copies so that each call reads them from DRAM), next to a plain grid-stride read
of the same bytes. A least-squares line through the four sizes, time = fixed + bytes / rate, splits
each product's time into a per-kernel fixed cost (ramp-up, prologue, tail) and the rate at which
its bytes stream once it runs. (The qkv product runs without its bias: a few KB more to read.)

At batch 1 a layer is a chain of such kernels, so the fixed costs add up: they are what a kernel
per op leaves on the table against the memory roofline (bench/NOTES.md #75).

    python bench/gemv_scaling.py --model qwen2.5-1.5b [--rows 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.op_times import _L2_BYTES, _READ_KERNEL, _time_graph  # noqa: E402

FACTORS = (1, 2, 4, 8)


def fit(nbytes: list[float], times: list[float]) -> tuple[float, float]:
    """(fixed us, rate in GB/s) of the least-squares line time = fixed + bytes / rate."""
    slope, fixed = np.polyfit(np.asarray(nbytes, float), np.asarray(times, float), 1)
    return float(fixed), float(1e-3 / slope)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rows", type=int, default=1, help="token rows of the step (1-2 run gemv.cu by default)")
    args = ap.parse_args()
    import cupy as cp

    from rvllm.backend.cuda import CudaBackend
    from rvllm.model.config import preset_spec

    s = preset_spec(args.model)
    b = CudaBackend("bfloat16")
    seed = iter(range(1, 1_000_000))
    w = lambda *shape: b.dummy_weight(shape, 0.02, next(seed))  # noqa: E731
    h, inter, B = s.hidden_size, s.intermediate_size, args.rows
    x, res, norm_w, xq, xi = w(B, h), w(B, h), w(h), w(B, s.q_size), w(B, inter)
    read = cp.RawKernel(_READ_KERNEL, "read_bytes")
    num_sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
    sink = cp.zeros(1, np.float32)

    products = [  # (name, output rows, K, the op on a weight matrix)
        ("add_norm + qkv", s.q_size + 2 * s.kv_size, h, lambda m: b.add_norm_linear(x, res, norm_w, 1e-6, m)),
        ("o_proj", h, s.q_size, lambda m: b.linear(xq, m)),
        ("add_norm + gate_up + SiLU", 2 * inter, h,
         lambda m: b.add_norm_linear(x, res, norm_w, 1e-6, m, None, "silu_and_mul")),
        ("down", h, inter, lambda m: b.linear(xi, m)),
    ]
    print(f"{args.model}, {B} row(s), {b.device_name}; us a call")
    print("| product | x1 | x2 | x4 | x8 | fixed us | GB/s | read: fixed us | read: GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, k, op in products:
        sizes, times, reads = [], [], []
        for f in FACTORS:
            nbytes = 2 * n * f * k
            mats = [w(n * f, k) for _ in range(max(2, min(64, -(-4 * _L2_BYTES // nbytes))))]
            reps = max(20, 2 * len(mats))

            def plain_read(i, mats=mats):
                m = mats[i % len(mats)]
                read((num_sms * 8,), (256,), (m, np.int64(m.nbytes // 16), sink), stream=b.stream)

            times.append(_time_graph(cp, b.stream, lambda i, mats=mats: op(mats[i % len(mats)]), reps, b.graph_capture))
            reads.append(_time_graph(cp, b.stream, plain_read, reps, b.graph_capture))
            sizes.append(nbytes)
            del mats
            cp.get_default_memory_pool().free_all_blocks()
        fixed, rate = fit(sizes, times)
        rfixed, rrate = fit(sizes, reads)
        print(f"| {name} ({n} x {k}) | " + " | ".join(f"{t:.2f}" for t in times)
              + f" | {fixed:.2f} | {rate:.0f} | {rfixed:.2f} | {rrate:.0f} |")


if __name__ == "__main__":
    main()
