"""GPU time of each backend op at one decode step's shapes (CUDA events, median of 50), to find
which kernel keeps batch-1 decode far from the memory roofline.

    python bench/op_times.py --model qwen2.5-1.5b --batch 1 --context 160
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=160)
    args = ap.parse_args()
    import cupy as cp

    from rvllm.backend.cpu import AttentionMetadata
    from rvllm.backend.cuda import CudaBackend
    from rvllm.model.config import preset_spec
    from rvllm.model.rope import cos_sin_table
    from rvllm.sampling.gpu_sampler import GpuSampler
    from rvllm.sampling.metadata import SamplingMetadata
    from rvllm import SamplingParams

    s, b, B = preset_spec(args.model), CudaBackend("bfloat16"), args.batch
    bs, ctx = 16, args.context
    h, qkv_out = s.hidden_size, s.q_size + 2 * s.kv_size
    w = lambda *shape: b.dummy_weight(shape, 0.02, 1)  # noqa: E731
    x = w(B, h)
    xq = w(B, s.q_size)
    weights = {"qkv": w(qkv_out, h), "o": w(h, s.q_size), "gate_up": w(2 * s.intermediate_size, h),
               "down": w(h, s.intermediate_size)}
    nblocks = -(-ctx // bs)
    kc = b.dummy_weight((B * nblocks + 1, bs, s.num_kv_heads, s.head_dim), 1.0, 2)
    vc = b.dummy_weight((B * nblocks + 1, bs, s.num_kv_heads, s.head_dim), 1.0, 3)
    tables = np.arange(B * nblocks, dtype=np.int32).reshape(B, nblocks)
    meta = AttentionMetadata(b.from_host(np.arange(B + 1, dtype=np.int32)), b.from_host(np.full(B, ctx, np.int32)),
                             b.from_host(tables), b.from_host((tables[:, -1] * bs + (ctx - 1) % bs).astype(np.int32)),
                             1, ctx, [1] * B, [ctx] * B)
    q = w(B, s.num_heads, s.head_dim)
    k, v = w(B, s.num_kv_heads, s.head_dim), w(B, s.num_kv_heads, s.head_dim)
    cos_sin = b.from_host(cos_sin_table(s, 4096))
    pos = b.from_host(np.full(B, ctx - 1, np.int32))
    lm_head = w(s.vocab_size, h)
    norm_w = w(h)
    sampler = GpuSampler(b)
    greedy = SamplingMetadata.from_requests([(SamplingParams(temperature=0), [1], [2], 2)] * B)
    logits = b.logits(x, lm_head)
    ops = {
        "qkv linear": lambda: b.linear(x, weights["qkv"]),
        "o_proj linear": lambda: b.linear(xq, weights["o"]),
        "gate_up linear": lambda: b.linear(x, weights["gate_up"]),
        "down linear": lambda: b.linear(b.silu_and_mul(b.linear(x, weights["gate_up"])), weights["down"]),
        "rms_norm": lambda: b.rms_norm(x, norm_w, 1e-6),
        "fused_add_rms_norm": lambda: b.fused_add_rms_norm(x, x, norm_w, 1e-6),
        "rotary+cache write": lambda: b.rotary_and_cache_write(q, k, v, pos, cos_sin, kc, vc, meta.slot_mapping, True),
        "decode attention": lambda: b.paged_attention(q, kc, vc, meta, s.head_dim ** -0.5),
        "logits": lambda: b.logits(x, lm_head),
        "greedy sampler (incl. D2H)": lambda: sampler(logits, greedy),
    }
    print(f"| op ({args.model}, batch {B}, context {ctx}) | median us | per-token bytes / us = GB/s |")
    print("|---|---|---|")
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(50):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1000)
        t = float(np.median(times))
        nbytes = {"qkv linear": weights["qkv"].nbytes, "o_proj linear": weights["o"].nbytes,
                  "gate_up linear": weights["gate_up"].nbytes,
                  "down linear": weights["gate_up"].nbytes + weights["down"].nbytes, "logits": lm_head.nbytes}.get(name)
        bw = f"{nbytes / t / 1e3:.0f}" if nbytes else ""
        print(f"| {name} | {t:.1f} | {bw} |")


if __name__ == "__main__":
    main()
