"""Every CUDA op against CpuBackend (the reference), on fresh random inputs, both 16-bit dtypes.

-m gpu; skipped where cupy or a CUDA device is missing. Every device allocation made during these
tests starts filled with 0xFF bytes (NaN in fp16, bf16 and fp32), so an output element a kernel
forgot to write shows up as a non-finite value. Inputs are rounded to the backend's dtype first
and the CPU reference gets the same rounded values, so the errors measured are the kernels' own.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from rvllm.backend import cuda_attention, cuda_decode_tc, cuda_gemv, cuda_rotary
from rvllm.backend.cpu import AttentionMetadata, CpuBackend
from rvllm.backend.fused import split_qkv
from rvllm.backend.cuda import is_cuda_available
from rvllm.bf16 import bf16_bits_to_float32 as bf16_bits_to_f32, float32_to_bf16_bits as f32_to_bf16_bits
from rvllm.model.config import ModelSpec
from rvllm.model.llama import LayerWeights, LlamaModel, ModelWeights
from rvllm.model.rope import cos_sin_table

requires_gpu = pytest.mark.skipif(not is_cuda_available(), reason="no CUDA device (cupy missing or no GPU)")
pytestmark = [pytest.mark.gpu, requires_gpu]

TOL = 2e-2
DTYPES = ("float16", "bfloat16")
CPU = CpuBackend()


@pytest.fixture(scope="module", params=DTYPES)
def gpu(request):
    from rvllm.backend.cuda import CudaBackend

    return CudaBackend(request.param, gemv_max_rows=cuda_gemv.MAX_ROWS)  # every compiled row count


@pytest.fixture(scope="module")
def gpu_tc(gpu):
    """The same dtype with every step of 1-8 rows on gemv_tc.cu's tensor-core products."""
    from rvllm.backend.cuda import CudaBackend

    return CudaBackend(gpu.dtype, gemv_max_rows=0, gemv_tc_max_rows=cuda_gemv.TC_MAX_ROWS, skinny_rows=(0, 0))


@pytest.fixture(scope="module")
def gpu_split(gpu):
    """The same dtype with the split (decode) kernel for every step: a second attention path."""
    from rvllm.backend.cuda import CudaBackend

    return CudaBackend(gpu.dtype, attention="split")


@pytest.fixture(scope="module", autouse=True)
def _poison_every_allocation(poisoned_allocations):
    yield


@pytest.fixture
def rng(request):
    # A seed per test id: different cases get different data, a rerun the same.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rounded(gpu, x):
    """x as the backend stores it (16-bit), back as float32: the CPU reference's input."""
    return gpu.to_host(gpu.weight(np.asarray(x, np.float32))).astype(np.float32)


def check(gpu, out, ref, name, tol=TOL):
    got = np.asarray(gpu.to_host(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{name}: {bad.sum()} non-finite elements (unwritten output?) at {np.argwhere(bad)[:5].tolist()}"
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol}"
    return err


def test_bf16_host_conversion():
    x = np.array([1.0, -2.5, 3.140625, 1e-40, np.inf, -np.inf, 65504.0, 1.00390625], np.float32)
    back = bf16_bits_to_f32(f32_to_bf16_bits(x))
    assert back[0] == 1.0 and back[1] == -2.5 and back[2] == 3.140625 and np.isinf(back[4:6]).all()
    assert back[7] == 1.0  # 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_weight_upload_through_staging_chunks(gpu, rng):
    """Checkpoint tensors go up through two pinned buffers in chunks (here 1000 bytes, so every
    tensor takes several, with odd sizes); concatenated parts land in their row ranges."""
    from rvllm.backend.cuda_upload import StagedUploader

    a = rng.standard_normal((37, 24)).astype(np.float32)
    b = rng.standard_normal((5, 24)).astype(np.float32)
    bits = f32_to_bf16_bits(b)  # a bf16 checkpoint tensor arrives as its uint16 bits
    # What the backend stores for each (rounded on the host: no device call before the swap below).
    as_stored = lambda x: bf16_bits_to_f32(f32_to_bf16_bits(x)) if gpu.dtype == "bfloat16" \
        else x.astype(np.float16).astype(np.float32)  # noqa: E731
    want = np.concatenate([as_stored(a), as_stored(bf16_bits_to_f32(bits)), as_stored(a[:3])])
    saved, gpu._uploader = gpu._uploader, StagedUploader(chunk_bytes=1000)
    try:
        got = gpu.weight_concat([(a, "float32"), (bits, "bfloat16"), (a[:3], "float32")])
        one = gpu.weight(bits, "bfloat16")
        assert gpu._uploader.bytes_uploaded == a.nbytes + bits.nbytes + a[:3].nbytes + bits.nbytes
        np.testing.assert_array_equal(gpu.to_host(got).astype(np.float32), want)
        np.testing.assert_array_equal(gpu.to_host(one).astype(np.float32), as_stored(bf16_bits_to_f32(bits)))
        gpu.weights_loaded()
        assert not gpu._uploader._buffers  # the pinned buffers are freed after loading
    finally:
        gpu._uploader = saved


# ---- elementwise and row ops ---------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("hidden", [64, 576, 4100])
def test_embedding(gpu, rng, num_tokens, hidden):
    vocab = 1000
    table = rounded(gpu, rng.standard_normal((vocab, hidden)))
    ids = rng.integers(0, vocab, num_tokens).astype(np.int32)
    out = gpu.embedding(gpu.from_host(ids), gpu.weight(table))
    got = gpu.to_host(out).astype(np.float32)
    np.testing.assert_array_equal(got, CPU.embedding(ids, table))


@pytest.mark.parametrize("shape", [(1000, 1001), (3,), (1,)])  # an odd count: the last pair's half
def test_dummy_weights(gpu, shape):
    """dummy_normal_kernel (--load-format dummy): every element written (allocations here start as
    NaN), normal by its moments and its one-sigma mass, the same values for the same seed."""
    draw = lambda std, seed, mean=0.0: gpu.to_host(gpu.dummy_weight(shape, std, seed, mean)).astype(np.float64)  # noqa: E731
    a = draw(0.02, 7)
    assert a.shape == shape and np.isfinite(a).all()
    np.testing.assert_array_equal(a, draw(0.02, 7))
    if a.size > 1:
        assert not np.array_equal(a, draw(0.02, 8))
    if a.size > 100_000:
        assert abs(a.mean()) < 2e-4
        assert abs(a.std() / 0.02 - 1) < 0.01
        assert abs(np.mean(np.abs(a) < 0.02) - 0.6827) < 0.005
        shifted = draw(0.5, 7, mean=3.0)
        assert abs(shifted.mean() - 3.0) < 0.01 and abs(shifted.std() / 0.5 - 1) < 0.01


@pytest.mark.parametrize("num_tokens", [1, 5, 129])
@pytest.mark.parametrize("d", [64, 576, 4096, 5000])
def test_rms_norm(gpu, rng, num_tokens, d):
    x = rounded(gpu, rng.standard_normal((num_tokens, d)) * 3)
    w = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    out = gpu.rms_norm(gpu.weight(x), gpu.weight(w), 1e-6)
    check(gpu, out, CPU.rms_norm(x, w, 1e-6), "rms_norm")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rms_norm_per_head_on_strided_view(gpu, rng, head_dim):
    """Qwen3's q/k norm: rms_norm over each head of q sliced out of the fused qkv output."""
    t, nh, nkv = 19, 8, 2
    qkv = rounded(gpu, rng.standard_normal((t, (nh + 2 * nkv) * head_dim)))
    w = rounded(gpu, 1 + 0.1 * rng.standard_normal(head_dim))
    qkv_dev = gpu.weight(qkv)
    q = qkv_dev[:, : nh * head_dim].reshape(t, nh, head_dim)
    k = qkv_dev[:, nh * head_dim: (nh + nkv) * head_dim].reshape(t, nkv, head_dim)
    q_ref = qkv[:, : nh * head_dim].reshape(t, nh, head_dim)
    k_ref = qkv[:, nh * head_dim: (nh + nkv) * head_dim].reshape(t, nkv, head_dim)
    check(gpu, gpu.rms_norm(q, gpu.weight(w), 1e-6), CPU.rms_norm(q_ref, w, 1e-6), "q_norm")
    check(gpu, gpu.rms_norm(k, gpu.weight(w), 1e-6), CPU.rms_norm(k_ref, w, 1e-6), "k_norm")


@pytest.mark.parametrize("num_tokens", [1, 33])
# 100: not a multiple of 8, the element-wise path; 16384: two 16-byte chunks a thread
@pytest.mark.parametrize("d", [64, 100, 576, 4096, 16384])
@pytest.mark.parametrize("fill_n", [0, 24, 36])  # 36: a bias the 16-byte copies cannot take
def test_fused_add_rms_norm(gpu, rng, num_tokens, d, fill_n):
    x = rounded(gpu, rng.standard_normal((num_tokens, d)))
    res = rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    w = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    res_dev = gpu.weight(res)
    fill = None
    if fill_n:
        bias = rounded(gpu, rng.standard_normal(fill_n))
        fill = (gpu.weight(np.full((num_tokens, fill_n), np.nan)), gpu.weight(bias))
    out, new_res = gpu.fused_add_rms_norm(gpu.weight(x), res_dev, gpu.weight(w), 1e-5, fill=fill)
    ref_out, ref_res = CPU.fused_add_rms_norm(x, res, w, 1e-5)
    check(gpu, out, ref_out, "normed")
    check(gpu, new_res, ref_res, "residual")
    check(gpu, res_dev, res, "input residual untouched", tol=1e-7)
    if fill_n:
        check(gpu, fill[0], np.broadcast_to(bias, (num_tokens, fill_n)), "bias rows", tol=1e-7)


@pytest.mark.parametrize("num_tokens", [1, 3, 8, 17, 33, 256])  # <= 8 rows: gemv.cu; more: cuBLAS
# 18944: segments of two stretches (cuda_gemv.split_k)
# (64, 99): a bias row of an odd length (broadcast_rows_kernel's element-wise copy, on cuBLAS's path)
@pytest.mark.parametrize("k,n", [(64, 96), (64, 99), (100, 40), (256, 768), (576, 1536), (1024, 4096), (8960, 1536),
                                 (18944, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(gpu, rng, num_tokens, k, n, bias):
    x = rounded(gpu, rng.standard_normal((num_tokens, k)))
    w = rounded(gpu, rng.standard_normal((n, k)) / np.sqrt(k))
    b = rounded(gpu, rng.standard_normal(n)) if bias else None
    out = gpu.linear(gpu.weight(x), gpu.weight(w), gpu.weight(b) if bias else None)
    check(gpu, out, CPU.linear(x, w, b), "linear")
    if num_tokens <= 8 and k % 8 == 0:  # the case above ran the small-batch kernel, not cuBLAS
        assert gpu.gemv.linear(gpu.weight(x), gpu.weight(w)) is not None


# More rows than gemv.cu takes; N of 96 and 520 (a reduce-kernel grid of partial blocks); K-slices of
# 1,120 to 9,472 columns; 256 rows with a K of 18,944 (4.8 M partial sums)
@pytest.mark.parametrize("num_tokens,k,n", [(9, 8960, 1536), (17, 8960, 96), (64, 4096, 520), (256, 18944, 96)])
@pytest.mark.parametrize("slices", [2, 4, 8])
def test_linear_k_slices(gpu, rng, monkeypatch, num_tokens, k, n, slices):
    """backend/cuda_ksplit.py: cuBLAS products of K-slices into fp32 partials, then the reduce kernel
    (gemm_reduce.cu), against the CPU; x with contiguous rows and with a row stride wider than K."""
    from rvllm.backend import cuda_ksplit

    monkeypatch.setattr(cuda_ksplit, "k_slices", lambda *a: slices)
    x = rounded(gpu, rng.standard_normal((num_tokens, k)))
    w = rounded(gpu, rng.standard_normal((n, k)) / np.sqrt(k))
    ref = CPU.linear(x, w, None)
    wd = gpu.weight(w)
    out = gpu.weight(np.full((num_tokens, n), np.nan, np.float32))  # an unwritten output stays NaN
    assert gpu.ksplit(gpu.weight(x), wd, out)  # the split path took it
    check(gpu, out, ref, f"linear in {slices} K-slices")
    check(gpu, gpu.linear(gpu.weight(x), wd), ref, f"backend linear, {slices} K-slices")
    strided = gpu.weight(np.concatenate([x, x[:, :64]], axis=1))[:, :k]  # rows 16-byte aligned, not contiguous
    check(gpu, gpu.linear(strided, wd), ref, f"backend linear, {slices} K-slices, strided x")


@pytest.mark.parametrize("num_tokens,d", [(3, 1536), (33, 96), (256, 1536), (5, 100)])  # 100: element-wise path
@pytest.mark.parametrize("slices", [2, 4, 8])
def test_fused_add_rms_norm_of_k_slice_sums(gpu, rng, num_tokens, d, slices):
    """fused_add_rms_norm given a product's K-slice partial sums (cuda_ksplit.KSliceSums) instead of
    x: the same bits as the reduce kernel's output passed as x, and the CPU's result on the sum
    (float32, in order of slice, rounded)."""
    import functools

    import cupy as cp

    from rvllm.backend.cuda_ksplit import KSliceSums

    parts = rng.standard_normal((slices, num_tokens, d)).astype(np.float32)
    res = rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    w = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    parts_dev, res_dev, w_dev = cp.asarray(parts), gpu.weight(res), gpu.weight(w)
    out, new_res = gpu.fused_add_rms_norm(KSliceSums(parts_dev), res_dev, w_dev, 1e-5)
    x = rounded(gpu, functools.reduce(np.add, parts))  # float32 adds in order, then 16 bits
    ref_out, ref_res = CPU.fused_add_rms_norm(x, res, w, 1e-5)
    check(gpu, out, ref_out, "normed")
    check(gpu, new_res, ref_res, "residual")
    check(gpu, res_dev, res, "input residual untouched", tol=1e-7)
    if num_tokens * d % 8 == 0:  # what the reduce kernel takes
        two = gpu.fused_add_rms_norm(gpu.ksplit.reduce(parts_dev), res_dev, w_dev, 1e-5)
        for got, want in zip((out, new_res), two):
            np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(want))
    with pytest.raises(ValueError, match="shapes"):
        gpu.fused_add_rms_norm(KSliceSums(parts_dev), res_dev[:-1], w_dev, 1e-5)


# 2: a gemv kernel's step, so the sums are reduced first; 17: past skinny_gemm.cu's rows on Hopper
@pytest.mark.parametrize("num_tokens", [2, 17, 33])
def test_ops_take_the_down_projection_as_k_slice_sums(gpu, rng, monkeypatch, num_tokens):
    """linear(..., feeds_add_norm=True) in K-slices returns the partial sums past the gemv kernels'
    rows, and the ops after the MLP (add_norm_linear, add_norm_logits, fused_add_rms_norm) give the
    same bits from partial sums as from the reduced output."""
    import cupy as cp

    from rvllm.backend import cuda_ksplit

    monkeypatch.setattr(cuda_ksplit, "k_slices", lambda *a: 4)
    k, h, n, vocab = 2048, 256, 384, 1000
    dev = lambda a: gpu.weight(np.asarray(a, np.float32))  # noqa: E731
    act = dev(rng.standard_normal((num_tokens, k)))
    down = dev(rng.standard_normal((h, k)) / np.sqrt(k))
    res = dev(rng.standard_normal((num_tokens, h)))
    norm_w = dev(1 + 0.1 * rng.standard_normal(h))
    w = dev(rng.standard_normal((n, h)) / np.sqrt(h))
    bias = dev(rng.standard_normal(n))
    lm_head = dev(rng.standard_normal((vocab, h)) / np.sqrt(h))
    returned = gpu.linear(act, down, feeds_add_norm=True)
    assert isinstance(returned, cuda_ksplit.KSliceSums) == (num_tokens > gpu.gemv.fused_rows)
    sums = cuda_ksplit.KSliceSums(gpu.ksplit.partials(act, down))  # at 2 rows too: those ops reduce it first
    reduced = gpu.linear(act, down)
    bits = lambda a: cp.asnumpy(a).view(np.uint8)  # noqa: E731

    for b, act_ in ((None, None), (bias, None), (None, "silu_and_mul")):
        got = gpu.add_norm_linear(sums, res, norm_w, 1e-6, w, b, act_)
        want = gpu.add_norm_linear(reduced, res, norm_w, 1e-6, w, b, act_)
        for g, x in zip(got, want):
            np.testing.assert_array_equal(bits(g), bits(x))
    got = gpu.add_norm_logits(sums, res, norm_w, 1e-6, lm_head)
    np.testing.assert_array_equal(bits(got), bits(gpu.add_norm_logits(reduced, res, norm_w, 1e-6, lm_head)))
    normed, _ = gpu.fused_add_rms_norm(sums, res, norm_w, 1e-6)
    np.testing.assert_array_equal(bits(normed), bits(gpu.fused_add_rms_norm(reduced, res, norm_w, 1e-6)[0]))


def test_linear_k_slices_in_a_graph(gpu, rng, monkeypatch):
    """The K-slice product captured in a CUDA graph (the batched cuBLAS call through ctypes while
    capturing, cuda_blas) and replayed on new inputs, as the decode graphs do."""
    import cupy as cp

    from rvllm.backend import cuda_ksplit

    monkeypatch.setattr(cuda_ksplit, "k_slices", lambda *a: 4)
    k, n, rows = 8960, 1536, 64
    x1, x2 = (rounded(gpu, rng.standard_normal((rows, k))) for _ in range(2))
    w = rounded(gpu, rng.standard_normal((n, k)) / np.sqrt(k))
    xd, wd = gpu.weight(x1), gpu.weight(w)
    pool = cp.cuda.MemoryPool()
    with gpu.stream, gpu.graph_capture():
        gpu.linear(xd, wd)  # warm-up: compiles the reduce kernel, lets cuBLAS choose
        gpu.stream.synchronize()
        with cp.cuda.using_allocator(pool.malloc):
            gpu.stream.begin_capture()
            out = gpu.linear(xd, wd)
            graph = gpu.stream.end_capture()
        for x in (x1, x2):
            xd[...] = gpu.weight(x)
            graph.launch(gpu.stream)
            gpu.stream.synchronize()
            check(gpu, out, CPU.linear(x, w, None), "linear in K-slices, graph replay")


def _add_norm_case(gpu, rng, num_tokens, d, n, form):
    """(x, residual, norm weight, w, bias, act) of an add_norm_linear case of `form` ("first_layer":
    no residual; "residual"; "bias"; "silu": SiLU-and-mul of w's halves), rounded to the dtype, and a
    device copier (None stays None)."""
    x = rounded(gpu, rng.standard_normal((num_tokens, d)))
    res = None if form == "first_layer" else rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    nw = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    w = rounded(gpu, rng.standard_normal((n, d)) / np.sqrt(d))
    b = rounded(gpu, rng.standard_normal(n)) if form == "bias" else None
    act = "silu_and_mul" if form == "silu" else None
    return x, res, nw, w, b, act, lambda a: None if a is None else gpu.weight(a)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 8, 9, 40])
# 3072 at 8 rows: 48 KiB of normed rows, which with the kernel's static shared memory needs the opt-in
@pytest.mark.parametrize("d,n", [(64, 96), (1536, 2048), (3072, 64), (3584, 512), (4096, 512), (4100, 64)])
@pytest.mark.parametrize("form", ["first_layer", "residual", "bias", "silu"])
def test_add_norm_linear(gpu, rng, num_tokens, d, n, form):
    """rms_norm(x + residual) @ W.T (+ bias, or SiLU-and-mul of the halves): one gemv.cu kernel at
    <= 8 rows with K a multiple of 8, the separate kernels and cuBLAS otherwise; both against the CPU."""
    x, res, nw, w, b, act, dev = _add_norm_case(gpu, rng, num_tokens, d, n, form)
    x_dev, res_dev = dev(x), dev(res)
    out, new_res = gpu.add_norm_linear(x_dev, res_dev, dev(nw), 1e-6, dev(w), dev(b), act)
    ref_out, ref_res = CPU.add_norm_linear(x, res, nw, 1e-6, w, b, act)
    check(gpu, out, ref_out, f"add_norm_linear {form}")
    check(gpu, new_res, ref_res, "new residual", tol=1e-2 if res is not None else 1e-7)
    check(gpu, x_dev, x, "input x untouched", tol=1e-7)
    if res is not None:
        check(gpu, res_dev, res, "input residual untouched", tol=1e-7)
    fused = gpu.gemv.add_norm_linear(x_dev, res_dev, dev(nw), 1e-6, dev(w), dev(b), act)
    assert (fused is not None) == (num_tokens <= 8 and d % 8 == 0)


@pytest.mark.parametrize("num_tokens", [1, 2, 3])
# 49152 and 30001 outputs: more units than one pass of the grid (SmolLM2's vocabulary; a ragged last
# pass); K = 576 and 1536 take 6-chunk stretches, 3584 8-chunk ones (cuda_gemv.logits_stretch_chunks);
# 4100: K not a multiple of 8 (the norm kernel and cuBLAS)
@pytest.mark.parametrize("d,vocab", [(64, 96), (576, 49152), (1536, 30001), (3584, 5000), (4100, 64)])
@pytest.mark.parametrize("form", ["first_layer", "residual"])
def test_add_norm_logits(gpu, rng, num_tokens, d, vocab, form):
    """The final norm and the logits: one gemv.cu kernel (float32 sums) at 1 row with K a multiple
    of 8, the norm kernel and cuBLAS otherwise; into a NaN-filled `out` and allocated; against the
    CPU."""
    import cupy as cp

    x = rounded(gpu, rng.standard_normal((num_tokens, d)))
    res = None if form == "first_layer" else rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    nw = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    w = rounded(gpu, rng.standard_normal((vocab, d)) / np.sqrt(d))
    dev = lambda a: None if a is None else gpu.weight(a)  # noqa: E731
    x_dev, res_dev, nw_dev, w_dev = dev(x), dev(res), dev(nw), dev(w)
    ref = CPU.add_norm_logits(x, res, nw, 1e-6, w)
    out = cp.full((num_tokens, vocab), np.nan, dtype=np.float32)
    got = gpu.add_norm_logits(x_dev, res_dev, nw_dev, 1e-6, w_dev, out=out)
    assert got is out and got.dtype == np.float32
    check(gpu, out, ref, f"add_norm_logits {form}")
    check(gpu, gpu.add_norm_logits(x_dev, res_dev, nw_dev, 1e-6, w_dev), ref, f"add_norm_logits {form}, allocated")
    check(gpu, x_dev, x, "input x untouched", tol=1e-7)
    out.fill(np.nan)
    fused = gpu.gemv.add_norm_logits(x_dev, res_dev, nw_dev, 1e-6, w_dev, out)
    assert (fused is not None) == (num_tokens == 1 and d % 8 == 0)
    if fused is not None:
        check(gpu, out, ref, f"add_norm_logits {form}, gemv.cu")


@pytest.mark.parametrize("num_tokens", [1, 2])
@pytest.mark.parametrize("warps", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("d,inter", [(1536, 8960), (3584, 2100)])
def test_add_norm_silu_block_sizes(gpu, rng, monkeypatch, num_tokens, warps, d, inter):
    """The SiLU form at every block size cuda_gemv.silu_block_warps may pick, with more units than
    one pass of the grid holds (qwen2.5-1.5b's gate_up: 8,960 units; the 3-chunk and 4-chunk
    stretch forms; 8 warps at 3 blocks an SM in bf16's 1-row 3-chunk build), against the CPU."""
    from rvllm.backend import cuda_gemv

    monkeypatch.setattr(cuda_gemv, "silu_block_warps", lambda *a: warps)
    x = rounded(gpu, rng.standard_normal((num_tokens, d)))
    res = rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    nw = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    w = rounded(gpu, rng.standard_normal((2 * inter, d)) / np.sqrt(d))
    out = gpu.gemv.add_norm_linear(gpu.weight(x), gpu.weight(res), gpu.weight(nw), 1e-6, gpu.weight(w), None, "silu_and_mul")
    assert out is not None
    ref_out, ref_res = CPU.add_norm_linear(x, res, nw, 1e-6, w, None, "silu_and_mul")
    check(gpu, out[0], ref_out, f"add_norm_linear silu, {warps}-warp blocks")
    check(gpu, out[1], ref_res, "new residual", tol=1e-2)


def _linear_case(gpu, rng, num_tokens, k, n, bias):
    """(x, w, b) of a product, rounded to the dtype (b None without bias), and a device copier."""
    x = rounded(gpu, rng.standard_normal((num_tokens, k)))
    w = rounded(gpu, rng.standard_normal((n, k)) / np.sqrt(k))
    b = rounded(gpu, rng.standard_normal(n)) if bias else None
    return x, w, b, lambda a: None if a is None else gpu.weight(a)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 5, 8])
# N not a multiple of 16 (a partial tile); K of 2 steps (one warp), 48 (6 warps), 592 (8 warps, 74 steps each)
@pytest.mark.parametrize("k,n", [(64, 96), (1536, 40), (1536, 2048), (18944, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_tensor_cores(gpu_tc, rng, num_tokens, k, n, bias):
    """gemv_tc.cu's product (tokens are the mma's n, K permuted within 32-column steps) against the CPU."""
    x, w, b, dev = _linear_case(gpu_tc, rng, num_tokens, k, n, bias)
    out = gpu_tc.gemv.linear(dev(x), dev(w), dev(b))
    assert out is not None  # the tensor-core kernel took it
    check(gpu_tc, out, CPU.linear(x, w, b), "linear (tensor cores)")
    strided = gpu_tc.weight(np.concatenate([x, x[:, :32]], axis=1))[:, :k]  # rows 16-byte aligned, not contiguous
    check(gpu_tc, gpu_tc.gemv.linear(strided, dev(w), dev(b)), CPU.linear(x, w, b), "linear (tensor cores, strided x)")


@pytest.fixture(scope="module")
def gpu_default(gpu):
    """The same dtype with the default small-batch routing (gemv.cu to 2 rows; from 3 rows
    skinny_gemm.cu on sm_90 (to 16), else gemv_tc.cu for the o_proj-shaped products (to 8))."""
    from rvllm.backend.cuda import CudaBackend

    return CudaBackend(gpu.dtype)


@pytest.mark.parametrize("num_tokens", [3, 5, 8])
# N <= K < 2N: o_proj of qwen2.5-1.5b (and a partial 16-row tile at 1528 outputs), a small one
@pytest.mark.parametrize("k,n", [(1536, 1536), (1536, 1528), (96, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_square_products_run_on_tensor_cores_by_default(gpu_default, rng, num_tokens, k, n, bias):
    """With the default settings, an o_proj-shaped product of 3-8 rows is gemv_tc.cu's (the small-batch
    path takes it) and matches the CPU; a down-shaped one (K >= 2N) is left to cuBLAS."""
    x, w, b, dev = _linear_case(gpu_default, rng, num_tokens, k, n, bias)
    out = gpu_default.gemv.linear(dev(x), dev(w), dev(b))
    assert out is not None  # the tensor-core kernel took it
    check(gpu_default, out, CPU.linear(x, w, b), "o_proj-shaped linear (tensor cores, default routing)")
    check(gpu_default, gpu_default.linear(dev(x), dev(w), dev(b)), CPU.linear(x, w, b), "the backend's linear")
    down = rounded(gpu_default, rng.standard_normal((n // 2, k)) / np.sqrt(k))  # K >= 2N
    assert gpu_default.gemv.linear(dev(x), dev(down)) is None


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("d,n", [(64, 96), (1536, 2048), (3584, 520), (4096, 48)])
@pytest.mark.parametrize("form", ["first_layer", "residual", "bias", "silu"])
def test_add_norm_linear_tensor_cores(gpu_tc, rng, num_tokens, d, n, form):
    """gemv_tc.cu's fused forms (8 staged rows, SiLU tiles of 8 gate and 8 up rows; 520: 260
    outputs, a partial SiLU tile) against the CPU."""
    x, res, nw, w, b, act, dev = _add_norm_case(gpu_tc, rng, num_tokens, d, n, form)
    x_dev, res_dev = dev(x), dev(res)
    fused = gpu_tc.gemv.add_norm_linear(x_dev, res_dev, dev(nw), 1e-6, dev(w), dev(b), act)
    assert fused is not None  # the tensor-core kernel took it
    ref_out, ref_res = CPU.add_norm_linear(x, res, nw, 1e-6, w, b, act)
    check(gpu_tc, fused[0], ref_out, f"add_norm_linear {form} (tensor cores)")
    check(gpu_tc, fused[1], ref_res, "new residual", tol=1e-2 if res is not None else 1e-7)
    check(gpu_tc, x_dev, x, "input x untouched", tol=1e-7)


@pytest.fixture(scope="module")
def gpu_wgmma(gpu):
    """The same dtype with every product of 1-1024 rows on gemm_wgmma.cu (sm_90 only)."""
    from rvllm.backend.cuda import CudaBackend

    b = CudaBackend(gpu.dtype, gemv_max_rows=0, wgmma_rows=(1, 1024), gemv_tc_square_max_rows=0,
                    skinny_rows=(0, 0))
    if b.wgmma is None:
        pytest.skip("gemm_wgmma.cu runs on compute capability 9.0 only")
    return b


# 1 and 9 rows: a 64-token tile mostly zeros; 65 / 130: the 128 and 256 tiles, partly filled; 300: two
# 256-token tiles. K of one 64-column tile up to 140 (8960); N of one to 36 weight tiles.
@pytest.mark.parametrize("num_tokens", [1, 9, 64, 65, 130, 256, 300])
@pytest.mark.parametrize("k,n", [(64, 128), (1536, 2048), (8960, 1536), (3584, 4608)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("splits", [None, 1, 3, 16])  # None: the wrapper's choice
def test_linear_wgmma(gpu_wgmma, rng, num_tokens, k, n, bias, splits):
    """gemm_wgmma.cu (tokens are wgmma's n, K split over blocks and summed in order) against the CPU,
    on contiguous and on row-strided x."""
    x = rounded(gpu_wgmma, rng.standard_normal((num_tokens, k)))
    w = rounded(gpu_wgmma, rng.standard_normal((n, k)) / np.sqrt(k))
    b = rounded(gpu_wgmma, rng.standard_normal(n)) if bias else None
    dev = lambda a: None if a is None else gpu_wgmma.weight(a)  # noqa: E731
    gpu_wgmma.wgmma.splits_override = splits
    try:
        out = gpu_wgmma.wgmma.linear(dev(x), dev(w), dev(b))
        assert out is not None  # the wgmma kernel took it
        ref = CPU.linear(x, w, b)
        check(gpu_wgmma, out, ref, "linear (wgmma)", tol=5e-3)
        strided = gpu_wgmma.weight(np.concatenate([x, x[:, :64]], axis=1))[:, :k]  # rows 16-byte aligned, not contiguous
        check(gpu_wgmma, gpu_wgmma.wgmma.linear(strided, dev(w), dev(b)), ref, "linear (wgmma, strided x)", tol=5e-3)
    finally:
        gpu_wgmma.wgmma.splits_override = None


@pytest.mark.parametrize("num_tokens", [40, 256])
@pytest.mark.parametrize("form", ["first_layer", "residual", "bias", "silu"])
def test_add_norm_linear_wgmma(gpu_wgmma, rng, num_tokens, form):
    """The norm kernel, then gemm_wgmma.cu (the bias in its epilogue, not prefilled for cuBLAS)."""
    d, n = 1536, 2048
    x, res, nw, w, b, act, dev = _add_norm_case(gpu_wgmma, rng, num_tokens, d, n, form)
    assert gpu_wgmma.wgmma.fits(dev(x), dev(w))
    out, new_res = gpu_wgmma.add_norm_linear(dev(x), dev(res), dev(nw), 1e-6, dev(w), dev(b), act)
    ref_out, ref_res = CPU.add_norm_linear(x, res, nw, 1e-6, w, b, act)
    check(gpu_wgmma, out, ref_out, f"add_norm_linear {form} (wgmma)")
    check(gpu_wgmma, new_res, ref_res, "new residual", tol=1e-2 if res is not None else 1e-7)


@pytest.fixture(scope="module")
def gpu_skinny(gpu):
    """The same dtype with steps of 3-16 rows on skinny_gemm.cu (sm_90 only; the default)."""
    from rvllm.backend.cuda import CudaBackend

    b = CudaBackend(gpu.dtype, skinny_rows=(3, 16))
    if b.skinny is None:
        pytest.skip("skinny_gemm.cu runs on compute capability 9.0 only")
    return b


# N: partial 64-row tiles (40, 96), qkv-shaped (2048), o_proj / down-shaped outputs (1536); K: one
# 64-column copy (a step is 256), a partial last step (1000), down's K (8960). Grids: one cluster of 8
# blocks (every tile shared by its blocks; at K <= 256 most hold nothing), 3 clusters of 2 (tiles
# dealt unevenly), 4-block clusters as many as the wrapper launches, the wrapper's grid.
@pytest.mark.parametrize("num_tokens", [3, 5, 8, 9, 16])
@pytest.mark.parametrize("k,n", [(64, 96), (1000, 40), (1536, 2048), (8960, 1536)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size,clusters", [(8, 1), (2, 3), (4, None), (None, None)])
def test_linear_skinny(gpu_skinny, rng, num_tokens, k, n, bias, size, clusters):
    """skinny_gemm.cu (the copy engine streams the weights, tokens are wgmma's n, a cluster's blocks
    share its tiles' K steps, split tiles summed through distributed shared memory in rank order)
    against the CPU, launched twice."""
    x, w, b, dev = _linear_case(gpu_skinny, rng, num_tokens, k, n, bias)
    ref = CPU.linear(x, w, b)
    gpu_skinny.skinny.cluster_size_override, gpu_skinny.skinny.clusters_override = size, clusters
    try:
        for launch in range(2):
            out = gpu_skinny.skinny.linear(dev(x), dev(w), dev(b))
            assert out is not None  # the skinny kernel took it
            check(gpu_skinny, out, ref, f"linear (skinny, launch {launch})", tol=5e-3)
        strided = gpu_skinny.weight(np.concatenate([x, x[:, :8]], axis=1))[:, :k]  # rows 16-byte aligned, not contiguous
        check(gpu_skinny, gpu_skinny.skinny.linear(strided, dev(w), dev(b)), ref, "linear (skinny, strided x)", tol=5e-3)
        check(gpu_skinny, gpu_skinny.linear(dev(x), dev(w), dev(b)), ref, "the backend's linear", tol=5e-3)
    finally:
        gpu_skinny.skinny.cluster_size_override = gpu_skinny.skinny.clusters_override = None


@pytest.mark.parametrize("num_tokens", [3, 8, 12, 16])
@pytest.mark.parametrize("form", ["first_layer", "residual", "bias", "silu"])
@pytest.mark.parametrize("d,n", [(1536, 2048), (1536, 17920), (1000, 136)])
def test_add_norm_linear_skinny(gpu_skinny, rng, num_tokens, form, d, n):
    """The norm kernel, then skinny_gemm.cu with the bias, or SiLU-and-mul over the tile's gate and up
    rows, in its epilogue (136 rows: an intermediate size of 68, a partial 32-row gate tile)."""
    x, res, nw, w, b, act, dev = _add_norm_case(gpu_skinny, rng, num_tokens, d, n, form)
    assert gpu_skinny.skinny.fits(num_tokens, d, dev(w), act, dev(b))
    calls = []
    real = gpu_skinny.skinny.linear
    gpu_skinny.skinny.linear = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    try:
        out, new_res = gpu_skinny.add_norm_linear(dev(x), dev(res), dev(nw), 1e-6, dev(w), dev(b), act)
    finally:
        del gpu_skinny.skinny.linear
    assert calls  # the skinny kernel ran the product
    ref_out, ref_res = CPU.add_norm_linear(x, res, nw, 1e-6, w, b, act)
    check(gpu_skinny, out, ref_out, f"add_norm_linear {form} (skinny)")
    check(gpu_skinny, new_res, ref_res, "new residual", tol=1e-2 if res is not None else 1e-7)


def test_skinny_leaves_other_rows(gpu_skinny, rng):
    """1-2 rows stay on gemv.cu and 17 on cuBLAS: the skinny kernel refuses them."""
    for rows in (1, 2, 17):
        x, w, _, dev = _linear_case(gpu_skinny, rng, rows, 256, 128, False)
        assert gpu_skinny.skinny.linear(dev(x), dev(w)) is None


def test_linear_on_row_strided_input(gpu, rng):
    x = rounded(gpu, rng.standard_normal((9, 200)))
    w = rounded(gpu, rng.standard_normal((48, 128)) / 12)
    out = gpu.linear(gpu.weight(x)[:, :128], gpu.weight(w))
    check(gpu, out, CPU.linear(x[:, :128], w), "linear strided")


@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_logits_are_float32(gpu, rng, num_tokens):
    x = rounded(gpu, rng.standard_normal((num_tokens, 576)))
    w = rounded(gpu, rng.standard_normal((5003, 576)) / 24)
    out = gpu.logits(gpu.weight(x), gpu.weight(w))
    assert out.dtype == np.float32
    check(gpu, out, CPU.logits(x, w), "logits", tol=1e-3)  # fp32 output: only accumulation-order error


@pytest.mark.parametrize("num_tokens", [1, 33])
@pytest.mark.parametrize("inter", [64, 1001, 1536, 5000])  # 1001: the scalar path (rows not 16-byte aligned)
def test_silu_and_mul(gpu, rng, num_tokens, inter):
    x = rounded(gpu, rng.standard_normal((num_tokens, 2 * inter)) * 3)
    check(gpu, gpu.silu_and_mul(gpu.weight(x)), CPU.silu_and_mul(x), "silu_and_mul")


# ---- rotary + KV cache write ---------------------------------------------------------------------

def _rope_spec(head_dim: int) -> ModelSpec:
    return ModelSpec(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=head_dim, intermediate_size=8,
                     num_layers=1, num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=500000.0)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_dim", [36, 64, 128])  # 36: half not a multiple of 4, the pair-per-thread path
@pytest.mark.parametrize("nh,nkv", [(8, 8), (12, 4), (14, 2)])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_rotary_and_cache_write(gpu, rng, neox, head_dim, nh, nkv, num_tokens):
    num_blocks, block_size, max_pos = 64, 16, 4096
    qkv = rounded(gpu, rng.standard_normal((num_tokens, (nh + 2 * nkv) * head_dim)))
    k_cache = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    v_cache = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    positions = rng.integers(0, max_pos, num_tokens).astype(np.int32)
    slots = rng.choice(num_blocks * block_size, num_tokens, replace=False).astype(np.int32)
    slots[rng.random(num_tokens) < 0.2] = -1  # padding rows: not written
    cos_sin = cos_sin_table(_rope_spec(head_dim), max_pos)

    def split(a, xp_reshape):
        q = a[:, : nh * head_dim]
        k = a[:, nh * head_dim: (nh + nkv) * head_dim]
        v = a[:, (nh + nkv) * head_dim:]
        return (xp_reshape(q, nh), xp_reshape(k, nkv), xp_reshape(v, nkv))

    q_r, k_r, v_r = split(qkv, lambda a, h: a.reshape(num_tokens, h, head_dim))
    kc_ref, vc_ref = k_cache.copy(), v_cache.copy()
    q_ref = CPU.rotary_and_cache_write(q_r, k_r, v_r, positions, cos_sin, kc_ref, vc_ref, slots, neox)

    kc, vc = gpu.weight(k_cache), gpu.weight(v_cache)
    q_d, k_d, v_d = split(gpu.weight(qkv), lambda a, h: a.reshape(num_tokens, h, head_dim))  # strided views
    q_out = gpu.rotary_and_cache_write(q_d, k_d, v_d, gpu.from_host(positions), gpu.from_host(cos_sin),
                                       kc, vc, gpu.from_host(slots), neox)
    check(gpu, q_out, q_ref, "rotated q")
    check(gpu, kc, kc_ref, "k_cache")
    check(gpu, vc, vc_ref, "v_cache", tol=1e-7)  # a copy: exact


@pytest.mark.parametrize("num_tokens", [1, 2, 3])  # 1-2: gemv_rope.cu; 3: the separate ops
@pytest.mark.parametrize("neox", [True, False])
# (hidden, nh, nkv, head_dim): qwen2.5-1.5b's layer (K = 1536: 3-chunk stretches, 2 warps a unit), llama's
# heads at K = 4096 (4 warps a unit, several units a warp), head_dim 36 (the separate ops), one head each
@pytest.mark.parametrize("d,nh,nkv,head_dim", [(1536, 12, 2, 128), (4096, 32, 8, 128), (520, 14, 2, 36), (64, 1, 1, 64)])
@pytest.mark.parametrize("form", ["first_layer", "residual", "bias"])
def test_add_norm_qkv_rotary(gpu, rng, num_tokens, neox, d, nh, nkv, head_dim, form):
    """add + RMSNorm + the qkv product + rotary + the KV cache write in one kernel for 1-2 rows
    (gemv_rope.cu) where one pass of its grid holds every unit, the separate kernels otherwise; q,
    the residual and both caches against the CPU. Then the kernel itself at any number of passes
    (the Llama-sized case takes several). With 2-3 rows one row's slot is -1 (padding: its k and v
    are not written)."""
    num_blocks, block_size, max_pos = 16, 16, 4096
    n = (nh + 2 * nkv) * head_dim
    x = rounded(gpu, rng.standard_normal((num_tokens, d)))
    res = None if form == "first_layer" else rounded(gpu, rng.standard_normal((num_tokens, d)) * 4)
    nw = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    w = rounded(gpu, rng.standard_normal((n, d)) / np.sqrt(d))
    b = rounded(gpu, rng.standard_normal(n)) if form == "bias" else None
    k_cache = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    v_cache = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    positions = rng.integers(0, max_pos, num_tokens).astype(np.int32)
    slots = rng.choice(num_blocks * block_size, num_tokens, replace=False).astype(np.int32)
    if num_tokens > 1:
        slots[rng.integers(num_tokens)] = -1
    cos_sin = cos_sin_table(_rope_spec(head_dim), max_pos)
    heads = (nh, nkv, head_dim)

    kc_ref, vc_ref = k_cache.copy(), v_cache.copy()
    q_ref, res_ref = CPU.add_norm_qkv_rotary(x, res, nw, 1e-6, w, b, heads, positions, cos_sin, kc_ref, vc_ref,
                                             slots, neox)
    dev = lambda a: None if a is None else gpu.weight(a)  # noqa: E731
    args = (dev(x), dev(res), dev(nw), 1e-6, dev(w), dev(b), heads, gpu.from_host(positions),
            gpu.from_host(cos_sin))

    def check_all(op, how):
        kc, vc = gpu.weight(k_cache), gpu.weight(v_cache)
        got = op(*args, kc, vc, gpu.from_host(slots), neox)
        if got is None:
            return False
        check(gpu, got[0], q_ref, f"rotated q ({how})")
        check(gpu, got[1], res_ref, f"new residual ({how})", tol=1e-2 if res is not None else 1e-7)
        check(gpu, kc, kc_ref, f"k_cache ({how})")
        check(gpu, vc, vc_ref, f"v_cache ({how})")  # every slot: the padding row's kept its old contents
        return True

    check_all(gpu.add_norm_qkv_rotary, "backend")
    half = head_dim // 2
    fits = num_tokens <= 2 and half & (half - 1) == 0  # built for 1-2 rows, pairs a power of two a head
    gpu.gemv.rope_one_pass = False
    try:
        assert check_all(gpu.gemv.add_norm_qkv_rotary, "gemv_rope.cu, any passes") == fits
    finally:
        gpu.gemv.rope_one_pass = True
    fused = gpu.gemv.add_norm_qkv_rotary(*args, gpu.weight(k_cache), gpu.weight(v_cache), gpu.from_host(slots), neox)
    if d == 4096:  # 3,072 units, 4 warps each: more than any GPU's one pass
        assert fused is None
    elif d == 64:  # 96 units: one pass anywhere
        assert (fused is not None) == fits


@pytest.mark.parametrize("placeholders", [True, False])
@pytest.mark.parametrize("rows,width", [(1, 1), (3, 5), (37, 64), (300, 130)])
def test_unpack_step_inputs(gpu, rng, rows, width, placeholders):
    """A step's staged inputs into the forward's buffer: copied (past them, the buffer keeps what it
    held), the token ids packed as -1 - k read from the previous sampled ids (some ids not), and the
    block tables from the per-slot table: new ids written from each row's first new column (some
    rows none, some whole), the rows gathered with zeros past each context, padding rows (slot -1)
    zero; the per-slot table updated as on the CPU. Twice, the second time on the table the first
    left; the index arrays are views of the staged buffer, as the runner passes them. The second
    time, with placeholders (every id then valid), the ids' embedding rows are gathered too (as
    CUDA-graph steps do)."""
    num_slots, W, bs = rows + 2, width + 3, 16
    table = rng.integers(0, 1000, (num_slots, W)).astype(np.int32)
    table_d = gpu.from_host(table)
    vocab, hidden = 60000, 128 if rows % 2 == 0 else 76  # 76: not 8-column chunks, the element-wise copy
    emb_d = gpu.weight(rng.standard_normal((vocab, hidden)).astype(np.float32))
    emb = gpu.to_host(emb_d)
    for it in range(2):
        gather = it == 1 and placeholders
        slots = rng.permutation(num_slots)[:rows].astype(np.int32)
        slots[rng.random(rows) < 0.1] = -1
        col0 = rng.integers(0, W, rows).astype(np.int32)
        counts = np.where(slots < 0, 0, rng.integers(0, 4, rows))
        counts = np.minimum(counts, W - col0)
        off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        new_ids = rng.integers(0, 1000, int(off[-1])).astype(np.int32)
        seq_lens = rng.integers(0, width * bs + 1, rows).astype(np.int32)
        prev = rng.integers(0, 50000, 2 * rows + 1).astype(np.int32)
        ids = rng.integers(0, 50000, 2 * rows).astype(np.int32)
        marked = rng.random(ids.size) < 0.5
        ids[marked] = -1 - rng.integers(0, prev.size, int(marked.sum()))
        head = rng.integers(-100, 100, 3).astype(np.int32)  # negative values outside the ids stay
        parts = [head, ids, slots, col0, off, new_ids, seq_lens]
        starts = np.cumsum([0] + [p.size for p in parts])
        src = np.concatenate(parts).astype(np.int32)
        views = [slice(int(starts[i]), int(starts[i + 1])) for i in range(2, 7)]
        dst = np.full(src.size + 5, -7, np.int32)
        out = np.full((rows, width), -9, np.int32)
        prev_arg = prev if placeholders else None
        rows_out = np.full((ids.size + 1, hidden), np.nan, np.float32)
        CPU.unpack_step_inputs(dst, src, int(starts[1]), ids.size, prev_arg, out, table,
                               *(src[v] for v in views), bs, (emb, rows_out) if gather else None)
        src_d = gpu.from_host(src)
        dst_d = gpu.from_host(np.full(src.size + 5, -7, np.int32))
        out_d = gpu.from_host(np.full((rows, width), -9, np.int32))
        rows_d = gpu.from_host(np.full((ids.size + 1, hidden), np.nan, np.float32), gpu.compute_dtype)
        gpu.unpack_step_inputs(dst_d, src_d, int(starts[1]), ids.size, gpu.from_host(prev) if placeholders else None,
                               out_d, table_d, *(src_d[v] for v in views), bs, (emb_d, rows_d) if gather else None)
        if gather:  # the rows gathered, the one past them untouched
            got = gpu.to_host(rows_d)
            assert np.array_equal(got[:-1], rows_out[:-1]) and np.isnan(got[-1]).all()
        assert (gpu.to_host(dst_d) == dst).all()
        assert (gpu.to_host(out_d) == out).all()
        assert (gpu.to_host(table_d) == table).all()
        assert (dst[starts[1]: starts[2]][marked] == (prev[-1 - ids[marked]] if placeholders else ids[marked])).all()


def test_step_buffers_in_turns(gpu, rng):
    """StepBuffers on the GPU, steps loaded back to back with no host wait, each behind a slow
    kernel on the current stream (so the upload stream runs ahead of the kernels that read its
    buffers): every step's unpacked inputs, read by a copy queued after its load, are its own."""
    import cupy as cp
    from array import array

    from rvllm.runner.step_inputs import StepBuffers, StepLayout

    lay = StepLayout(8, 8, 4, 32)
    buffers = StepBuffers(gpu, lay.size, num_slots=8, max_width=4)
    busy = cp.ones((4096, 4096), np.float32)
    seen, sent = [], []
    with gpu.stream:
        for step in range(12):
            data = rng.integers(0, 1000, lay.size).astype(np.int32)
            data[lay.row_slots: lay.row_slots + 8] = np.arange(8)
            data[lay.col0: lay.col0 + 8] = 0
            data[lay.diff_off: lay.diff_off + 9] = np.arange(0, 36, 4)
            data[lay.seq_lens: lay.seq_lens + 8] = 64
            busy @ busy  # ~1 ms on the current stream before this step's unpack kernel
            buffers.load(array("i", data.tobytes()), lay, 16)
            seen.append((buffers.device[: lay.size].copy(), buffers.views(lay)[-1].copy()))
            sent.append(data)
        gpu.synchronize()
    for data, (flat, tables) in zip(sent, seen):
        assert (cp.asnumpy(flat) == data).all()
        assert (cp.asnumpy(tables) == data[lay.new_ids:].reshape(8, 4)).all()


# ---- paged attention -----------------------------------------------------------------------------

def _attention_case(gpu, rng, reqs, nkv, group, head_dim, block_size=16, pad_rows=0):
    """reqs: [(query_len, seq_len)]. Random q and cache contents; each request's blocks are a
    random scattering of the cache's blocks. Returns (host inputs, device inputs)."""
    nh = nkv * group
    q_lens = [q for q, _ in reqs]
    seq_lens = [s for _, s in reqs]
    num_tokens = sum(q_lens) + pad_rows
    blocks_per = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per) + 3
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = np.zeros((len(reqs), max(max(blocks_per), 1)), np.int32)
    i = 0
    for r, nb in enumerate(blocks_per):
        tables[r, :nb] = perm[i: i + nb]
        i += nb
    q = rounded(gpu, rng.standard_normal((num_tokens, nh, head_dim)))
    kc = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    vc = rounded(gpu, rng.standard_normal((num_blocks, block_size, nkv, head_dim)))
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    sl = np.asarray(seq_lens, np.int32)
    kw = dict(max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_lens_host=q_lens, seq_lens_host=seq_lens)
    meta = AttentionMetadata(qsl, sl, tables, None, **kw)
    meta_d = AttentionMetadata(gpu.from_host(qsl), gpu.from_host(sl), gpu.from_host(tables), None, **kw)
    return (q, kc, vc, meta), (gpu.weight(q), gpu.weight(kc), gpu.weight(vc), meta_d)


def _run_attention(backends, rng, reqs, nkv, group, head_dim, pad_rows=0, block_size=16):
    gpu = backends[0]
    (q, kc, vc, meta), (q_d, kc_d, vc_d, meta_d) = _attention_case(gpu, rng, reqs, nkv, group, head_dim, block_size,
                                                                    pad_rows)
    scale = head_dim ** -0.5
    ref = CPU.paged_attention(q, kc, vc, meta, scale)
    for b in backends:
        out = b.paged_attention(q_d, kc_d, vc_d, meta_d, scale)
        check(b, out, ref, f"paged_attention[{b.attention}] reqs={reqs} nkv={nkv} group={group} hd={head_dim} "
                           f"block_size={block_size}")


DECODE_LENS = [1, 15, 16, 17, 100, 1000, 1500]


SPLIT_BUILDS = list(cuda_attention.DECODE_SPLIT_BUILDS)


def _force_decode_build(monkeypatch, name):
    """Every decode step on attention_decode.cu's or attention_decode_tc.cu's build `name`."""
    from rvllm.backend import cuda_attention

    if name in cuda_attention.DECODE_SPLIT_BUILDS:
        threads = cuda_attention.DECODE_SPLIT_BUILDS[name]
    else:
        threads = 32 * cuda_attention.DECODE_TC_BUILDS[name][0]
    monkeypatch.setattr(cuda_attention, "decode_build", lambda *a: (name, threads))


@pytest.mark.parametrize("build", SPLIT_BUILDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
def test_decode_attention_context_lengths(gpu, rng, monkeypatch, build, head_dim, group):
    """One decode row per request, on each build of the split kernel; contexts across block and
    partition boundaries."""
    _force_decode_build(monkeypatch, build)
    _run_attention([gpu], rng, [(1, n) for n in DECODE_LENS], nkv=2, group=group, head_dim=head_dim)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_attention_batches(gpu, rng, monkeypatch, batch):
    """attention_decode.cu's builds (the tensor-core kernels, which such steps would get, are held
    back): 64 rows x 8 KV heads run the lean build (cuda_attention.split_build)."""
    from rvllm.backend import cuda_attention

    monkeypatch.setattr(cuda_attention, "_TC_MIN_PAIRS_PER_SM", float("inf"))
    monkeypatch.setattr(cuda_attention, "TC_SHORT_CONTEXT", 0)
    monkeypatch.setattr(cuda_attention, "TC_SPLIT", False)
    lens = rng.integers(1, 2100, batch).tolist()
    _run_attention([gpu], rng, [(1, n) for n in lens], nkv=8, group=4, head_dim=128)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 7, 16])
def test_decode_attention_wide_build(gpu, rng, monkeypatch, head_dim, group):
    """Steps of <= 8 (row, KV head) pairs run the 512-thread build (cuda_attention.decode_build; the
    tensor-core kernels, which these steps get, held back): contexts inside one 128-key partition,
    across its boundary, and long enough to combine; and a padding row."""
    from rvllm.backend import cuda_attention

    monkeypatch.setattr(cuda_attention, "TC_SHORT_CONTEXT", 0)
    monkeypatch.setattr(cuda_attention, "TC_SPLIT", False)
    assert cuda_attention.decode_build(1, 2, head_dim, gpu.num_sms, group, 129)[0] == "paged_attention_split_wide_kernel"
    _run_attention([gpu], rng, [(1, 1), (1, 128), (1, 129)], nkv=2, group=group, head_dim=head_dim, pad_rows=1)
    _run_attention([gpu], rng, [(1, 2000)], nkv=2, group=group, head_dim=head_dim)


def test_decode_attention_idle_request_and_padding_rows(gpu, rng):
    """A request with no query row owns nothing; rows past the last request come back zero."""
    _run_attention([gpu], rng, [(1, 40), (0, 30), (1, 700)], nkv=2, group=4, head_dim=64, pad_rows=3)


def test_decode_attention_large_group(gpu, rng):
    """More query heads per KV head than the kernel holds at once (8): two passes, > 48 KB shared memory."""
    _run_attention([gpu], rng, [(1, 33), (1, 600)], nkv=1, group=16, head_dim=128)


@pytest.fixture(params=["w1_t32_s3", "w4_t16_s3"])
def tensor_core_decode(request, monkeypatch):
    """Every decode step on one build of attention_decode_tc.cu (warps per pair x keys per tile),
    whatever its size (where head size and group allow). Returns the kernel's name."""
    from rvllm.backend import cuda_attention

    name = f"paged_attention_decode_tc_{request.param}_kernel"
    assert name in cuda_attention.DECODE_TC_BUILDS
    monkeypatch.setattr(cuda_attention, "_TC_MIN_PAIRS_PER_SM", 0)
    monkeypatch.setattr(cuda_attention, "tc_build", lambda pairs, num_sms: name)
    return name


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 7, 16])
def test_decode_attention_tensor_cores(gpu, rng, tensor_core_decode, head_dim, group):
    """The tensor-core decode kernel: contexts inside one tile, across tile and block boundaries
    and long (so every warp of a block gets tiles, and some get one more); a request with no query
    row; padding rows (zeros); group sizes up to the 16 rows of an mma tile; head size 80 (an odd
    number of 16-dim k-steps)."""
    from rvllm.backend import cuda_attention

    assert cuda_attention.decode_build(1, 2, head_dim, gpu.num_sms, group)[0] == tensor_core_decode
    reqs = [(1, n) for n in DECODE_LENS + [31, 32, 33, 64, 2000]] + [(0, 30)]
    _run_attention([gpu], rng, reqs, nkv=2, group=group, head_dim=head_dim, pad_rows=2)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_decode_attention_tensor_cores_chosen_for_short_contexts(gpu, rng, monkeypatch, rows):
    """Small steps whose contexts are all at most TC_SHORT_CONTEXT tokens run the tensor-core kernel
    (against the CPU reference); one longer context sends the step to the tensor-core build split
    over the context. CUDA graphs capture a second graph for exactly the step sizes where the two
    differ."""
    from rvllm.backend import cuda_attention

    limit, sms = 192, gpu.num_sms
    monkeypatch.setattr(cuda_attention, "TC_SHORT_CONTEXT", limit)  # the default
    assert cuda_attention.decode_build(rows, 2, 128, sms, 6, limit)[0] in cuda_attention.DECODE_TC_BUILDS
    assert cuda_attention.decode_build(rows, 2, 128, sms, 6, limit + 1)[0] == cuda_attention.DECODE_TC_SPLIT
    assert cuda_attention.decode_build(rows, 2, 128, sms, 17, limit)[0] not in cuda_attention.DECODE_TC_BUILDS
    assert cuda_attention.short_context_limit(rows, 2, 128, sms, 6, 8192) == limit
    assert cuda_attention.short_context_limit(rows, 2, 128, sms, 6, limit) is None  # nothing longer to split off
    assert cuda_attention.short_context_limit(rows, 2, 128, sms, 17, 8192) is None  # no tensor-core build
    assert cuda_attention.short_context_limit(sms, 2, 128, sms, 6, 8192) is None  # tensor cores at any context
    lens = [int(n) for n in rng.integers(1, limit + 1, rows)]
    lens[0] = limit
    _run_attention([gpu], rng, [(1, n) for n in lens], nkv=2, group=6, head_dim=128, pad_rows=1)
    name = cuda_attention.decode_build(rows, 2, 128, sms, 6, limit)[0]
    if 2 * rows <= sms:  # at most a pair an SM: the build that asks for the smallest carveout (NOTES #50)
        assert name == cuda_attention.DECODE_TC_ONE_PER_SM
        kernel = gpu._kernel("attention_decode_tc.cu", name, 128)
        assert kernel.preferred_shared_memory_carveout == 0


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 7, 16])
@pytest.mark.parametrize("form", ["l2-chosen", "l2-64-keys", "cluster-chosen", "cluster-2", "cluster-16"])
def test_decode_attention_tensor_core_split(gpu, rng, monkeypatch, head_dim, group, form):
    """The tensor-core decode kernel split over the context (flash-decoding): contexts inside one
    partition (written directly), across tile, block and partition boundaries, and long (4,100 keys:
    with 64-key partitions, 65 partitions, more (head, partition) entries than the combine's threads
    load in one round); a request with no query row; padding rows (zeros).
    - l2: the last block of a row's pairs combines the partitions from L2; at the partition size the
      backend picks and at 64 keys (the smallest: many partitions to combine). Then a second step:
      had the first left a counter above zero, no block of a pair would find itself last, and the
      poisoned output would show.
    - cluster (sm_90): a pair's blocks in a thread block cluster, combined through its shared
      memory, at the size the backend picks (2 blocks for the many-row step, 16 for one row) and at 2
      and 16 blocks a cluster; the form combined in L2 must not run."""
    from rvllm.backend import cuda_launch

    name = cuda_attention.DECODE_TC_SPLIT
    monkeypatch.setattr(cuda_attention, "decode_build", lambda *a: (name, 128))
    if form.startswith("cluster"):
        if not cuda_launch.clusters_available():
            pytest.skip("thread block clusters need sm_90")
        monkeypatch.setattr(cuda_decode_tc, "_tc_split_launch", lambda *a: pytest.fail("the form combined in L2 ran"))
        if form != "cluster-chosen":
            monkeypatch.setattr(cuda_decode_tc, "_cluster_form", lambda *a, n=int(form.split("-")[1]): n)
    else:
        monkeypatch.setattr(cuda_attention, "TC_CLUSTER", False)
        if form == "l2-64-keys":
            monkeypatch.setattr(cuda_attention, "tc_split_partition", lambda *a: 64)
    reqs = [(1, n) for n in DECODE_LENS + [31, 32, 33, 64, 65, 128, 129, 2000, 4100]] + [(0, 30)]
    _run_attention([gpu], rng, reqs, nkv=2, group=group, head_dim=head_dim, pad_rows=2)
    _run_attention([gpu], rng, [(1, 1000)], nkv=2, group=group, head_dim=head_dim)


def test_cluster_form_spreads_few_pairs_over_the_sms(gpu):
    """cuda_decode_tc's choice of blocks a cluster on this GPU: at least 8 (16 on an H200) for batch 1
    at 2 KV heads, fewer as the pairs grow (every pair's cluster resident at once), none (the form
    combined in L2) when a cluster of 2 no longer fits the rule."""
    from rvllm.backend import cuda_launch, nvrtc

    if not cuda_launch.clusters_available():
        pytest.skip("thread block clusters need sm_90")
    kernel = gpu._kernel("attention_decode_tc.cu", cuda_attention.DECODE_TC_CLUSTER, 128)
    smem = nvrtc.decode_tc_smem_bytes(128, 4, 16, 3)
    gpu._ensure_smem(kernel, smem)
    sizes = {pairs: cuda_decode_tc._cluster_form(gpu, kernel, pairs, smem)
             for pairs in (1, 2, 8, 16, 32, 64, gpu.num_sms // 2, 100)}
    assert sizes[1] == sizes[2] >= 8, sizes
    assert all(sizes[p] >= sizes[q] for p, q in zip((1, 2, 8, 16, 32), (2, 8, 16, 32, 64))), sizes
    assert sizes[100] == 1 and sizes[gpu.num_sms // 2] == 2, sizes  # a cluster of 2 a pair fills the SMs
    for pairs, blocks in sizes.items():
        if blocks > 1:
            assert kernel.max_active_clusters((1, 1, blocks), (128,), smem, blocks) >= pairs


def test_decode_attention_tensor_cores_chosen_for_large_steps(gpu, rng):
    """A step whose (row, KV head) pairs fill the GPU twice runs the tensor-core kernel by default."""
    from rvllm.backend import cuda_attention

    rows = gpu.num_sms  # x 2 KV heads
    assert cuda_attention.decode_build(rows, 2, 128, gpu.num_sms, 6)[0] in cuda_attention.DECODE_TC_BUILDS
    assert cuda_attention.decode_build(rows, 2, 128, gpu.num_sms, 17)[0] not in cuda_attention.DECODE_TC_BUILDS
    lens = rng.integers(1, 600, rows).tolist()
    _run_attention([gpu], rng, [(1, n) for n in lens], nkv=2, group=6, head_dim=128)


def _decode_rope_case(gpu, rng, reqs, nkv, group, head_dim, pad_rows, block_size=16):
    """A decode step's inputs for rotary + attention: _attention_case's cache and metadata, a random
    qkv product, positions at each request's new key, and slots from the block tables (the last
    padding row gets a spare block's slot: its k and v are written, as the rotary kernel writes
    them; other padding rows -1). Returns (host, device) tuples of (qkv, k_cache, v_cache, meta,
    positions, cos_sin)."""
    nh = nkv * group
    (_, kc, vc, meta), (_, kc_d, vc_d, meta_d) = _attention_case(gpu, rng, reqs, nkv, group, head_dim, block_size,
                                                                 pad_rows)
    rows = sum(q for q, _ in reqs) + pad_rows
    qkv = rounded(gpu, rng.standard_normal((rows, (nh + 2 * nkv) * head_dim)))
    positions = rng.integers(0, 4096, rows).astype(np.int32)
    slots = np.full(rows, -1, np.int32)
    row = 0
    for r, (q_len, seq_len) in enumerate(reqs):
        if q_len:
            positions[row] = seq_len - 1
            slots[row] = meta.block_tables[r, (seq_len - 1) // block_size] * block_size + (seq_len - 1) % block_size
            row += q_len
    if pad_rows:  # a block no request holds (_attention_case keeps 3 spare)
        used = {int(meta.block_tables[r, i]) for r, (_, n) in enumerate(reqs) for i in range(-(-n // block_size))}
        spare = min(set(range(kc.shape[0])) - used)
        slots[-1] = spare * block_size + int(rng.integers(block_size))
    cos_sin = cos_sin_table(_rope_spec(head_dim), 4096)
    meta.slot_mapping, meta_d.slot_mapping = slots, gpu.from_host(slots)
    return ((qkv, kc, vc, meta, positions, cos_sin),
            (gpu.weight(qkv), kc_d, vc_d, meta_d, gpu.from_host(positions), gpu.from_host(cos_sin)))


DECODE_TC_NAMES = sorted(set(cuda_attention.DECODE_TC_BUILDS) - {cuda_attention.DECODE_TC_SPLIT})  # with rope builds


@pytest.mark.parametrize("build", DECODE_TC_NAMES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 80: an odd number of k-steps (interleaved pairs only)
@pytest.mark.parametrize("group", [1, 7, 16])
def test_decode_attention_with_rotary(gpu, rng, monkeypatch, build, neox, head_dim, group):
    """The tensor-core decode kernel's rope builds (cuda_decode_tc.decode_rope): rotary of the raw
    qkv product, the new k and v into the cache, and attention over it, against the CPU's rotary
    then attention. New keys on both sides of 16-key tile edges (contexts 16, 17, 32, 33, 48, 49)
    and in tiles 0-3 of a row, so each warp of a build puts a row's key into its stage; a request with
    no query row;
    padding rows (zeros; one writes its slot). neox at head size 80 is not built (None)."""
    nkv = 2
    reqs = [(1, n) for n in DECODE_LENS + [2, 31, 32, 33, 47, 48, 49, 64, 2000]] + [(0, 30)]
    host, dev = _decode_rope_case(gpu, rng, reqs, nkv, group, head_dim, pad_rows=2)
    qkv, kc, vc, meta, positions, cos_sin = host
    heads, scale = (nkv * group, nkv, head_dim), head_dim ** -0.5
    q, k, v = split_qkv(qkv, heads)
    q_ref = CPU.rotary_and_cache_write(q, k, v, positions, cos_sin, kc, vc, meta.slot_mapping, neox)
    ref = CPU.paged_attention(q_ref, kc, vc, meta, scale)

    _force_decode_build(monkeypatch, build)
    monkeypatch.setattr(cuda_attention, "DECODE_ROPE", True)  # both off by default
    monkeypatch.setattr(cuda_attention, "DECODE_ROPE_ONE_PER_SM", True)
    qkv_d, kc_d, vc_d, meta_d, pos_d, cs_d = dev
    out = cuda_decode_tc.decode_rope(gpu, qkv_d, heads, pos_d, cs_d, kc_d, vc_d, meta_d, scale, neox)
    if neox and head_dim % 32:
        assert out is None
        return
    check(gpu, out, ref, f"attention ({build})")
    check(gpu, kc_d, kc, "k_cache")
    check(gpu, vc_d, vc, "v_cache", tol=1e-7)  # a copy: exact; the padding row's slot written


@pytest.mark.parametrize("case", ["gemv_rope", "attention", "one_per_sm", "split", "prefill"])
def test_qkv_rotary_attention_routes(gpu, rng, monkeypatch, case):
    """CudaBackend.qkv_rotary_attention against the CPU on the steps that take each of its paths,
    and whether the rotary kernel ran: 1 row (rotary inside the qkv product, gemv_rope.cu), a row
    an SM at 2 KV heads (inside the tensor-core decode kernel), 40 rows (the one-pair-per-SM build:
    the rotary kernel), 3 rows with a 1000-token context (the tensor-core decode kernel split over
    the context, which has no rope build: the rotary kernel), a prefill step (the rotary kernel,
    then the prefill kernel; decode_build would give its rows the split build)."""
    nkv, group, head_dim, d = 2, 6, 128, 1536  # qwen2.5-1.5b's attention
    nh = nkv * group
    reqs = {"gemv_rope": [(1, 20)], "attention": [(1, int(n)) for n in rng.integers(1, 300, gpu.num_sms)],
            "one_per_sm": [(1, int(n)) for n in rng.integers(1, 300, 40)],
            "split": [(1, 1000), (1, 5), (1, 77)], "prefill": [(7, 7), (1, 40), (20, 300)]}[case]
    rotary_calls = []
    real_rotary = cuda_rotary.rotary_and_cache_write
    monkeypatch.setattr(cuda_rotary, "rotary_and_cache_write", lambda *a: rotary_calls.append(1) or real_rotary(*a))
    monkeypatch.setattr(gpu.gemv, "rope_one_pass", False)  # 1 row on gemv_rope.cu whatever the SM count
    monkeypatch.setattr(cuda_attention, "DECODE_ROPE", True)  # off by default
    host, dev = _decode_rope_case(gpu, rng, reqs, nkv, group, head_dim, pad_rows=0)
    _, kc, vc, meta, positions, cos_sin = host
    rows = positions.shape[0]
    if case == "prefill":  # every row its own position and slot
        positions = np.concatenate([np.arange(s - q, s) for q, s in reqs]).astype(np.int32)
        meta.slot_mapping = np.concatenate([[meta.block_tables[r, p // 16] * 16 + p % 16 for p in range(s - q, s)]
                                            for r, (q, s) in enumerate(reqs)]).astype(np.int32)
        dev[3].slot_mapping = gpu.from_host(meta.slot_mapping)
    x = rounded(gpu, rng.standard_normal((rows, d)))
    res = rounded(gpu, rng.standard_normal((rows, d)) * 4)
    nw = rounded(gpu, 1 + 0.1 * rng.standard_normal(d))
    w = rounded(gpu, rng.standard_normal(((nh + 2 * nkv) * head_dim, d)) / np.sqrt(d))
    b = rounded(gpu, rng.standard_normal((nh + 2 * nkv) * head_dim))
    heads, scale = (nh, nkv, head_dim), head_dim ** -0.5
    ref, res_ref = CPU.qkv_rotary_attention(x, res, nw, 1e-6, w, b, heads, positions, cos_sin, kc, vc, meta, True,
                                            scale)
    _, kc_d, vc_d, meta_d, _, cs_d = dev
    dv = gpu.weight
    out, res_d = gpu.qkv_rotary_attention(dv(x), dv(res), dv(nw), 1e-6, dv(w), dv(b), heads, gpu.from_host(positions),
                                          cs_d, kc_d, vc_d, meta_d, True, scale)
    check(gpu, out, ref, f"attention output ({case})")
    check(gpu, res_d, res_ref, "residual", tol=1e-2)
    check(gpu, kc_d, kc, "k_cache")
    check(gpu, vc_d, vc, "v_cache")
    name = cuda_attention.decode_build(rows, nkv, head_dim, gpu.num_sms, group, meta.max_seq_len)[0]
    unsplit_tc = name in cuda_attention.DECODE_TC_BUILDS and name != cuda_attention.DECODE_TC_SPLIT
    assert unsplit_tc == (case in ("gemv_rope", "attention", "one_per_sm")), name
    assert (name == cuda_attention.DECODE_TC_SPLIT) == (case in ("split", "prefill")), name
    assert len(rotary_calls) == (0 if case in ("gemv_rope", "attention") else 1), case


PREFILL_REQS = [
    (15, 15), (16, 16), (17, 17), (100, 100),  # fresh prompts across block boundaries
    (37, 1037),   # a chunk after a long cached prefix
    (1, 500),     # a decode row in a mixed step
    (0, 20),      # a request with nothing scheduled
    (64, 80),     # a chunk after a short prefix
]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
def test_prefill_attention_ragged(gpu, gpu_split, rng, head_dim, group):
    """Tensor-core prefill kernel and the split kernel on the same ragged step."""
    _run_attention([gpu, gpu_split], rng, PREFILL_REQS, nkv=2, group=group, head_dim=head_dim, pad_rows=2)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_attention_other_head_sizes(gpu, gpu_split, rng, head_dim):
    _run_attention([gpu, gpu_split], rng, [(20, 20), (5, 300), (1, 77)], nkv=2, group=3, head_dim=head_dim)
    _run_attention([gpu], rng, [(1, 20), (1, 1100)], nkv=2, group=3, head_dim=head_dim)


@pytest.mark.parametrize("block_size", [1, 8, 32, 128])
def test_attention_block_sizes(gpu, gpu_split, rng, monkeypatch, block_size):
    """--block-size takes any power of two up to 128, and every attention kernel maps a key to its
    cache block through the block table: a ragged prefill step (tensor-core prefill kernel and the
    split kernel), then decode steps on each build of both decode kernels."""
    from rvllm.backend import cuda_attention

    _run_attention([gpu, gpu_split], rng, PREFILL_REQS, nkv=2, group=4, head_dim=128, pad_rows=1, block_size=block_size)
    decode = [(1, n) for n in (1, 7, 16, 33, 128, 129, 1500)] + [(0, 9)]
    for build in [*SPLIT_BUILDS, *cuda_attention.DECODE_TC_BUILDS]:
        _force_decode_build(monkeypatch, build)
        _run_attention([gpu], rng, decode, nkv=2, group=7, head_dim=128, pad_rows=1, block_size=block_size)


def test_attention_rejects_block_size_not_power_of_two(gpu, rng):
    """The kernels find a key's cache block by shifts, so the wrapper refuses other block sizes."""
    _, (q, kc, vc, meta) = _attention_case(gpu, rng, [(1, 30)], nkv=2, group=2, head_dim=64, block_size=12)
    with pytest.raises(ValueError, match="power of two"):
        gpu.paged_attention(q, kc, vc, meta, 0.125)


def test_prefill_attention_long_prompt(gpu, rng):
    _run_attention([gpu], rng, [(1100, 1100), (3, 3)], nkv=2, group=4, head_dim=128)


# ---- the whole model -----------------------------------------------------------------------------

def _tiny_spec(variant: str) -> ModelSpec:
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(variant, "LlamaForCausalLM")
    return ModelSpec(architecture=arch, vocab_size=384, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                     max_position_embeddings=512, attention_bias=variant == "qwen2", qk_norm=variant == "qwen3",
                     rope_neox=variant != "llama-interleaved")


def _host_weights(spec: ModelSpec, rng, gpu):
    def mat(*shape, std=None):
        return rounded(gpu, rng.standard_normal(shape) * (std if std is not None else shape[-1] ** -0.5))

    def norm(n):
        return rounded(gpu, 1 + 0.1 * rng.standard_normal(n))

    h, qkv = spec.hidden_size, spec.q_size + 2 * spec.kv_size
    layers = [dict(input_norm=norm(h), qkv=mat(qkv, h), qkv_bias=mat(qkv, std=0.1) if spec.attention_bias else None,
                   o_proj=mat(h, spec.q_size), post_norm=norm(h), gate_up=mat(2 * spec.intermediate_size, h),
                   down=mat(h, spec.intermediate_size),
                   q_norm=norm(spec.head_dim) if spec.qk_norm else None,
                   k_norm=norm(spec.head_dim) if spec.qk_norm else None) for _ in range(spec.num_layers)]
    return dict(embed=mat(spec.vocab_size, h, std=1.0), layers=layers, final_norm=norm(h), lm_head=mat(spec.vocab_size, h))


def _weights_on(backend, host, cos_sin):
    def put(a):
        return None if a is None else backend.weight(a)

    layers = [LayerWeights(**{k: put(v) for k, v in layer.items()}) for layer in host["layers"]]
    return ModelWeights(put(host["embed"]), layers, put(host["final_norm"]), put(host["lm_head"]),
                        backend.from_host(cos_sin))


def _step(backend, ids, positions, slots, qsl, seq_lens, tables):
    q_lens = np.diff(qsl).tolist()
    meta = AttentionMetadata(
        backend.from_host(np.asarray(qsl, np.int32)), backend.from_host(np.asarray(seq_lens, np.int32)),
        backend.from_host(np.asarray(tables, np.int32)), backend.from_host(np.asarray(slots, np.int32)),
        max(q_lens), max(seq_lens), q_lens, list(seq_lens))
    return backend.from_host(np.asarray(ids, np.int32)), backend.from_host(np.asarray(positions, np.int32)), meta


@pytest.mark.parametrize("variant", ["llama", "llama-interleaved", "qwen2", "qwen3"])
def test_llama_forward_matches_cpu(gpu, rng, variant):
    """Prefill of two prompts, then a decode step, through LlamaModel on both backends."""
    spec = _tiny_spec(variant)
    host = _host_weights(spec, rng, gpu)
    cos_sin = cos_sin_table(spec, 512)
    block_size, num_blocks = 16, 12
    cache_shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    models, caches = {}, {}
    for name, b in (("cpu", CPU), ("gpu", gpu)):
        models[name] = LlamaModel(spec, _weights_on(b, host, cos_sin), b)
        caches[name] = [(b.zeros(cache_shape, b.compute_dtype), b.zeros(cache_shape, b.compute_dtype))
                        for _ in range(spec.num_layers)]
    tables = [[3, 7, 0], [0, 5, 9]]
    lens = [13, 40]

    def slots_for(req, positions):
        return [tables[req][p // block_size] * block_size + p % block_size for p in positions]

    # Step 1: both prompts whole.
    ids = rng.integers(0, spec.vocab_size, sum(lens)).tolist()
    positions = list(range(lens[0])) + list(range(lens[1]))
    slots = slots_for(0, range(lens[0])) + slots_for(1, range(lens[1]))
    step1 = dict(ids=ids, positions=positions, slots=slots, qsl=[0, lens[0], sum(lens)], seq_lens=lens, tables=tables)
    # Step 2: one decode token each.
    step2 = dict(ids=rng.integers(0, spec.vocab_size, 2).tolist(), positions=lens,
                 slots=slots_for(0, [lens[0]]) + slots_for(1, [lens[1]]), qsl=[0, 1, 2],
                 seq_lens=[lens[0] + 1, lens[1] + 1], tables=tables)
    for i, step in enumerate((step1, step2)):
        hidden = {}
        for name, b in (("cpu", CPU), ("gpu", gpu)):
            ids_d, pos_d, meta = _step(b, **step)
            hidden[name] = models[name].forward(ids_d, pos_d, caches[name], meta)
        check(gpu, hidden["gpu"], hidden["cpu"], f"{variant} step {i + 1} hidden")
        logits_cpu = models["cpu"].compute_logits(hidden["cpu"])
        logits_gpu = models["gpu"].compute_logits(hidden["gpu"])
        check(gpu, logits_gpu, logits_cpu, f"{variant} step {i + 1} logits")
