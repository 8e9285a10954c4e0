"""Products with a long K and few output tiles (the MLP's down projection at 3 to a few hundred token
rows) as cuBLAS products of K-slices into fp32 partial sums, added in a fixed order by
kernels_cu/gemm_reduce.cu.

cublasGemmEx splits such a product over K itself (its split-K kernel, then cublasLt's
splitKreduce_kernel), and the pair is slower than one strided-batched call over S slices of K
(cuBLAS then picks an unsplit kernel for each) followed by our reduction. H200, session 21
(bench/gemm_k_slices.py, us a product with the reduction): qwen2.5-1.5b's down (1536 x 8960) at
256 rows 17.8 with gemmEx against 15.3 in 4 slices, at 512 rows 26.2 against 23.1 in 2;
qwen2.5-7b's (3584 x 18944) at 128 rows 43.9 against 40.3 in 2. bench/RESULTS.md has the tables.

The rule (k_slices), for products whose K is at least twice their N: as many slices (8, 4 or 2) as
keep the output tiles of 128 x 128 times the slices within FILL of the SMs (2 slices: within all of
them), with slices of at least MIN_SLICE_K columns (shorter ones lost). bench/gemm_k_slices.py times
every S against gemmEx at a model's shapes, to check the rule on another card. The partial sums
(S x rows x N floats, a few MB) are allocated per call, as the product's output is.
"""
from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

from rvllm.backend import cuda_blas

TILE = 128  # the output tile the rule counts in (rows and columns)
FILL = 0.76  # tiles x slices (4 or 8) at most this share of the SMs (100 of an H100's or H200's 132);
# 2 slices up to all of them (qwen2.5-7b's and llama-3.1-8b's down at 256 rows: 56 and 64 tiles gained
# in 2 slices, 7b at 128 rows lost in 4)
MIN_SLICE_K = 2048
LONG_K = 2  # only products with K >= LONG_K * N: down (K / N = 3.5-5.8 in the presets). llama-3.1-8b's
# qkv (6144 x 4096) lost at every row count, its o_proj (4096 x 4096) at 64-128 rows
SLICES = (8, 4, 2)


def k_slices(rows: int, n: int, k: int, num_sms: int) -> int:
    """How many K-slices the product of `rows` token rows by an [n, k] weight takes (1: one gemmEx)."""
    if k < LONG_K * n:
        return 1
    tiles = -(-rows // TILE) * -(-n // TILE)
    for s in SLICES:
        fill = 1.0 if s == 2 else FILL
        if k % (8 * s) == 0 and k // s >= MIN_SLICE_K and tiles * s <= fill * num_sms:
            return s
    return 1


class KSliceSums:
    """A product's output left as its K-slices' float32 partial sums (`parts`, [S, rows, N]), for an
    add + RMSNorm to sum as it reads them (CudaBackend.fused_add_rms_norm): the reduce kernel and its
    launch gap leave the chain. CudaBackend.linear returns one only when asked (feeds_add_norm) and
    only for steps that the add + norm ops run as their own kernel (more rows than the gemv kernels
    take); every op that receives one either passes it to that kernel or reduces it first."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = tuple(parts.shape[1:])  # [rows, N], as the reduced output's
        self.size = self.shape[0] * self.shape[1]


class KSliceGemm:
    """out = x @ weight.T as k_slices() cuBLAS products of K-slices and the reduce kernel."""

    def __init__(self, ops, num_sms: int):
        self.ops = ops
        self.num_sms = num_sms

    def partials(self, x, weight):
        """The K-slices' float32 partial products [S, rows, N] when the rule splits the product, else
        None (nothing launched). x: [rows, K] with contiguous rows, 16-byte aligned; weight [N, K]
        C-contiguous."""
        rows, k = x.shape
        n = weight.shape[0]
        s = k_slices(rows, n, k, self.num_sms)
        if s < 2 or n % 8 or x.strides[0] % 16 or x.data.ptr % 16 or weight.data.ptr % 16 \
                or not weight.flags.c_contiguous:
            return None
        ks = k // s  # a multiple of 8: every slice starts 16-byte aligned
        parts = cp.empty((s, rows, n), dtype=np.float32)
        ops = self.ops
        cuda_blas.gemm_strided_batched_ex(
            n, rows, ks, ops._alpha.ctypes.data, weight.data.ptr, ops._gemm_type, k, ks,
            x.data.ptr, ops._gemm_type, x.strides[0] // x.itemsize, ks,
            ops._beta0.ctypes.data, parts.data.ptr, cuda_blas.CUDA_R_32F, n, rows * n, s)
        return parts

    def __call__(self, x, weight, out) -> bool:
        """Runs the product into `out` ([rows, N], C-contiguous, the compute dtype) when the rule
        splits it; returns False (nothing launched) otherwise."""
        if not out.flags.c_contiguous:
            return False
        parts = self.partials(x, weight)
        if parts is None:
            return False
        self.reduce(parts, out)
        return True

    def reduce(self, parts, out=None):
        """The partial products [S, rows, N] added in order of slice -> out [rows, N] (the compute dtype)."""
        s, rows, n = parts.shape
        if out is None:
            out = cp.empty((rows, n), dtype=self.ops.compute_dtype)
        elems = rows * n
        threads = 256
        blocks = min(-(-(elems // 8) // threads), 8 * self.num_sms)
        if elems:
            self.ops._kernel("gemm_reduce.cu", "k_slices_reduce_kernel")(
                (blocks,), (threads,), (out, parts, np.int64(elems), np.int32(s)))
        return out
