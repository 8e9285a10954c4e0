"""GPU time of each op of one decode layer (and the logits) at one step's shapes, to find which
kernel keeps batch-1 decode from the memory roofline.

Each op is captured `reps` times into one CUDA graph and the replays are timed with CUDA events, so
launch gaps are those of the real decode graphs. The weights rotate through enough copies that
every launch reads them from DRAM (the H100's L2 is 50 MB), as in a real forward. Next to each
weight-reading op: its bandwidth, cuBLAS on the same shapes, and a plain grid-stride read of the
same number of bytes (what a kernel of that size can reach on this card).

Back-to-back launches of a PDL kernel overlap: each starts its pre-wait work while the previous one
runs. An op with a long prologue reads short here: decode attention at 256 rows x 192 keys timed
14.1-15.6 us in this graph, where ncu gives one launch 20.9 us and a real run's launches ~21 us
(bench/NOTES.md #81).

    python bench/op_times.py --model qwen2.5-1.5b --batch 1 --context 128
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

_READ_KERNEL = r"""
extern "C" __global__ void read_bytes(const uint4* __restrict__ p, long long n, float* out) {
  unsigned int acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) out[0] = 1.f;  // keeps the loads
}
"""
_L2_BYTES = 50 << 20
# Rows that time ops of other rows together (and logits, once a step): left out of "one layer (sum)".
COMBINED_ROWS = ("add_norm + qkv + rotary + KV write", "add_norm + qkv + rotary + KV write + decode attention",
                 "logits")


def _time_graph(cp, stream, build, reps: int, graph_capture) -> float:
    """Median microseconds per call of build(i) over replays of a graph of `reps` calls."""
    with stream, graph_capture():
        build(0)  # warm-up: compiles kernels and lets cuBLAS choose before capture
        stream.synchronize()
        stream.begin_capture()
        for i in range(reps):
            build(i)
        graph = stream.end_capture()
        graph.upload(stream)
        for _ in range(3):
            graph.launch(stream)
        times = []
        for _ in range(10):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1000 / reps)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--gemv-tc-max-rows", type=int, default=None,
                    help="steps of up to this many rows run gemv_tc.cu's kernels (default: $RVLLM_GEMV_TC_MAX_ROWS, else off)")
    ap.add_argument("--scatter-blocks", type=int, default=1, metavar="F",
                    help="a KV cache of F times the blocks the step reads, each request's blocks drawn at random from "
                         "it (as after a long-running block pool), instead of one contiguous run per request")
    ap.add_argument("--attention-variants", action="store_true",
                    help="also time the decode kernel at other partition sizes, and the tensor-core prefill kernel on the decode step")
    args = ap.parse_args()
    import cupy as cp

    from rvllm.backend.cuda import CudaBackend
    from rvllm.backend.cuda_attention import DecodeWorkspace
    from rvllm.model.config import preset_spec
    from rvllm.model.rope import cos_sin_table
    from rvllm.runner.step_inputs import StepMetadata

    s, B, ctx, bs = preset_spec(args.model), args.batch, args.context, 16
    b = CudaBackend("bfloat16", gemv_tc_max_rows=args.gemv_tc_max_rows)
    # The same ops on cuBLAS (and separate norm / SiLU kernels), whatever $RVLLM_GEMV_*MAX_ROWS say.
    blas = CudaBackend("bfloat16", gemv_max_rows=0, gemv_tc_max_rows=0, gemv_tc_square_max_rows=0,
                       skinny_rows=(0, 0))
    blas.stream = b.stream
    h, qkv_out, inter = s.hidden_size, s.q_size + 2 * s.kv_size, s.intermediate_size
    seed = iter(range(1, 10_000))
    w = lambda *shape: b.dummy_weight(shape, 0.02, next(seed))  # noqa: E731

    def copies(*shape):
        nbytes = 2 * int(np.prod(shape))
        return [w(*shape) for _ in range(max(1, min(64, -(-4 * _L2_BYTES // nbytes))))]

    W = {"qkv": copies(qkv_out, h), "o": copies(h, s.q_size), "gate_up": copies(2 * inter, h),
         "down": copies(h, inter), "lm_head": [w(s.vocab_size, h)]}
    bias = w(qkv_out) if s.attention_bias else None
    x, res, norm_w = w(B, h), w(B, h), w(h)
    xq, xi, xg = w(B, s.q_size), w(B, inter), w(B, 2 * inter)
    nblocks = -(-ctx // bs)
    # With --scatter-blocks F the attention ops rotate through F block tables that share no block, so
    # consecutive calls read different 8 KB blocks from DRAM (not the L2 the last call filled).
    F = max(1, args.scatter_blocks)
    kc = b.dummy_weight((F * B * nblocks + 1, bs, s.num_kv_heads, s.head_dim), 1.0, 2)
    vc = b.dummy_weight((F * B * nblocks + 1, bs, s.num_kv_heads, s.head_dim), 1.0, 3)
    order = np.random.default_rng(0).permutation(F * B * nblocks) if F > 1 else np.arange(B * nblocks)
    ws = DecodeWorkspace.allocate(B, s.num_heads, s.head_dim, 8192, b.from_host(np.array([nblocks], np.int32)))
    metas = []
    for table in order.astype(np.int32).reshape(F, B, nblocks):
        last = table[:, (ctx - 1) // bs]  # each request's new key goes to its last block
        metas.append(StepMetadata(b.from_host(np.arange(B + 1, dtype=np.int32)), b.from_host(np.full(B, ctx, np.int32)),
                                  b.from_host(table), b.from_host((last * bs + (ctx - 1) % bs).astype(np.int32)),
                                  max_query_len=1, max_seq_len=ctx, query_lens_host=[1] * B, seq_lens_host=[ctx] * B,
                                  decode_workspace=ws))
    meta = metas[0]
    q = w(B, s.num_heads, s.head_dim)
    k, v = w(B, s.num_kv_heads, s.head_dim), w(B, s.num_kv_heads, s.head_dim)
    cos_sin = b.from_host(cos_sin_table(s, 4096))
    pos = b.from_host(np.full(B, ctx - 1, np.int32))
    heads = (s.num_heads, s.num_kv_heads, s.head_dim)
    eps = 1e-6
    read = cp.RawKernel(_READ_KERNEL, "read_bytes")
    num_sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
    sink = cp.zeros(1, np.float32)

    def reader(name):
        mats = W[name]

        def run(i):
            m = mats[i % len(mats)]
            read((num_sms * 8,), (256,), (m, np.int64(m.nbytes // 16), sink), stream=b.stream)
        return run

    def rot(name, fn):
        mats = W[name]
        return lambda i: fn(mats[i % len(mats)])

    def qkv_attention(be):
        """The attention half up to o_proj as one backend op (rotary inside the qkv product's kernel
        at 1-2 rows, inside the tensor-core decode kernel where a step runs it)."""
        mats = W["qkv"]
        return lambda i: be.qkv_rotary_attention(x, res, norm_w, eps, mats[i % len(mats)], bias, heads, pos, cos_sin,
                                                 kc, vc, metas[i % F], True, s.head_dim ** -0.5)

    ops = [
        ("add_norm + qkv", "qkv", rot("qkv", lambda m: b.add_norm_linear(x, res, norm_w, eps, m, bias)),
         rot("qkv", lambda m: blas.add_norm_linear(x, res, norm_w, eps, m, bias))),
        ("rotary + KV write", None, lambda i: b.rotary_and_cache_write(q, k, v, pos, cos_sin, kc, vc, meta.slot_mapping,
                                                                       True), None),
        # The two ops above as one (gemv_rope.cu at 1-2 rows where one pass holds every unit; else both)
        ("add_norm + qkv + rotary + KV write", "qkv",
         rot("qkv", lambda m: b.add_norm_qkv_rotary(x, res, norm_w, eps, m, bias, heads, pos, cos_sin, kc, vc,
                                                    meta.slot_mapping, True)),
         rot("qkv", lambda m: blas.add_norm_qkv_rotary(x, res, norm_w, eps, m, bias, heads, pos, cos_sin, kc, vc,
                                                       meta.slot_mapping, True))),
        ("decode attention", None, lambda i: b.paged_attention(q, kc, vc, metas[i % F], s.head_dim ** -0.5), None),
        ("add_norm + qkv + rotary + KV write + decode attention", "qkv", qkv_attention(b), qkv_attention(blas)),
        ("o_proj", "o", rot("o", lambda m: b.linear(xq, m)), rot("o", lambda m: blas.linear(xq, m))),
        ("add_norm + gate_up + SiLU", "gate_up",
         rot("gate_up", lambda m: b.add_norm_linear(x, res, norm_w, eps, m, None, "silu_and_mul")),
         rot("gate_up", lambda m: blas.add_norm_linear(x, res, norm_w, eps, m, None, "silu_and_mul"))),
        ("down", "down", rot("down", lambda m: b.linear(xi, m)), rot("down", lambda m: blas.linear(xi, m))),
        ("logits", "lm_head", rot("lm_head", lambda m: b.logits(x, m)), None),
        # The cuBLAS path's separate kernels (steps of more rows than the GEMV kernels take):
        ("(cuBLAS path) fused_add_rms_norm", None, lambda i: b.fused_add_rms_norm(x, res, norm_w, eps), None),
        ("(cuBLAS path) silu_and_mul", None, lambda i: b.silu_and_mul(xg), None),
    ]
    if args.attention_variants:
        from rvllm.backend import cuda_attention

        scale = s.head_dim ** -0.5
        eager = StepMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_mapping, 1, ctx,
                             [1] * B, [ctx] * B)

        def with_choice(attr, value, ms):
            """The decode attention op with cuda_attention.<attr> (a chooser) answering `value`, call i
            on step metadata ms[i % len(ms)]."""
            def run(i):
                saved = getattr(cuda_attention, attr)
                setattr(cuda_attention, attr, lambda *a: value)
                try:
                    b.paged_attention(q, kc, vc, ms[i % len(ms)], scale)
                finally:
                    setattr(cuda_attention, attr, saved)
            return run

        for kname, threads in (*cuda_attention.DECODE_SPLIT_BUILDS.items(),
                               *((n, 32 * b[0]) for n, b in cuda_attention.DECODE_TC_BUILDS.items())):
            # decode_build also sets the partition size (through the workspace's layout)
            ops.append((f"decode attention, {kname}", None, with_choice("decode_build", (kname, threads), metas), None))
        for size in (32, 64, 128, 256, 512):
            ops.append((f"decode attention, eager, {size}-key partitions", None,
                        with_choice("partition_size", size, [eager]), None))
        ops.append(("decode attention, tensor-core prefill kernel", None,
                    lambda i: cuda_attention._attention_prefill(b, q, kc, vc, eager, scale, B, bs), None))
    print(f"| op ({args.model}, batch {B}, context {ctx}, {b.device_name}) | us | GB/s | cuBLAS path us "
          f"| grid-stride read of the same bytes, us |")
    print("|---|---|---|---|---|")
    layer = 0.0
    for name, wname, fn, blas_fn in ops:
        reps = max(20, 2 * len(W[wname])) if wname else 20
        t = _time_graph(cp, b.stream, fn, reps, b.graph_capture)
        nbytes = W[wname][0].nbytes if wname else 0
        t_blas = _time_graph(cp, b.stream, blas_fn, reps, b.graph_capture) if blas_fn else None
        t_read = _time_graph(cp, b.stream, reader(wname), reps, b.graph_capture) if wname else None
        if name not in COMBINED_ROWS and not name.startswith(("decode attention,", "(cuBLAS path)")):
            layer += t
        print(f"| {name} | {t:.1f} | {f'{nbytes / t / 1e3:.0f}' if nbytes else ''} | "
              f"{f'{t_blas:.1f}' if t_blas else ''} | {f'{t_read:.1f}' if t_read else ''} |")
    print(f"| one layer (sum) | {layer:.1f} | | | |")


if __name__ == "__main__":
    main()
