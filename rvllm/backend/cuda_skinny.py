"""Products of decode steps of 3-16 token rows on Hopper: the wrapper of kernels_cu/skinny_gemm.cu.

CudaBackend.linear and add_norm_linear (after the norm kernel; the SiLU form too) route steps of
`min_rows`..`max_rows` rows (DEFAULT_ROWS, below) past gemv.cu's here on compute capability 9.0;
other GPUs, and shapes the copy engine cannot take (K not a multiple of 8, rows not 16-byte
aligned), stay on the other paths. The weights
stream through shared memory by the bulk tensor copy engine and the tokens are wgmma's n (8 or 16);
each cluster of 2, 4 or 8 blocks (`cluster_shape` picks the size per product) takes whole output
tiles and shares their 256-column K steps evenly, and a tile split between a cluster's blocks is
summed through distributed shared memory in rank order (see the kernel file).
"""
from __future__ import annotations

import os

import numpy as np

from rvllm.backend import nvrtc
from rvllm.backend.cuda_launch import tensor_map_2d

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

FILE = "skinny_gemm.cu"
SKINNY_TOKENS = (8, 16)  # token tiles of the kernel file's entry points
SK_BM, SK_BK = 64, 64  # must match skinny_gemm.cu
KSUB = 4  # SK_KSUB: copies of SK_BK columns a stage, so a K step is SK_BK * KSUB columns
SK_THREADS = 128 + 32  # a warpgroup multiplies, a warp issues the copies
SK_STAGES = {8: 5, 16: 4}  # by token tile: SK_STAGES_N8, SK_STAGES_N16
CLUSTER_SIZES = (2, 4, 8)  # blocks a cluster (they share its tiles' K steps); SK_CLUSTER_MAX is the last
BLOCKS_PER_SM = 1  # the kernel's launch bounds
# Steps of DEFAULT_ROWS[0]..DEFAULT_ROWS[1] rows take these kernels by default on sm_90
# (CudaBackend(skinny_rows=...), $RVLLM_SKINNY_ROWS="lo-hi": "3-8" leaves 9-16 rows to cuBLAS, "0-0"
# is off). H200, 128/128 requests, output tok/s (medians of 3 runs; bench/NOTES.md #110), off against
# on: qwen2.5-1.5b 4 of them 2,441 -> 2,690 and 2,484 -> 2,730, 8 of them 4,957 -> 5,399; qwen2.5-7b 4
# 940 -> 977, 8 1,854 -> 1,920; llama-3.1-8b 4 895 -> 922, 8 1,751 -> 1,812. 16 requests, 3-8 against
# 3-16: qwen2.5-1.5b 8,896 / 8,838 -> 8,971 / 8,827, qwen2.5-7b 3,462 -> 3,539, llama-3.1-8b 3,286 -> 3,346.
DEFAULT_ROWS = (3, 16)


def parse_rows(text: str) -> tuple[int, int]:
    """$RVLLM_SKINNY_ROWS ("lo-hi", e.g. "3-16"; "0-0" off) as (lo, hi)."""
    parts = text.split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) > int(parts[1]) \
            or int(parts[1]) > SKINNY_TOKENS[-1]:
        raise ValueError(f"RVLLM_SKINNY_ROWS must be 'lo-hi' with lo <= hi <= {SKINNY_TOKENS[-1]} "
                         f"(e.g. 3-16, or 0-0 for off), got {text!r}")
    return int(parts[0]), int(parts[1])


def smem_bytes(bn: int) -> int:
    """Dynamic shared memory of the n = bn build: its stages of 64 weight rows and bn token rows of
    a K step's columns, plus the slack that aligns the first tile to 1024 bytes."""
    return SK_STAGES[bn] * (SK_BM + bn) * SK_BK * KSUB * 2 + 1024


def static_smem_bytes(bn: int) -> int:
    """The build's static shared memory, about: the receiving buffer of a cluster's shares (a share
    of 64 rows x bn tokens from each rank), a tile's sums and the barriers."""
    return CLUSTER_SIZES[-1] * SK_BM * bn * 4 + SK_BM * (bn + 1) * 4 + 512


def token_tile(rows: int) -> int:
    """The smallest token tile (wgmma's n) that holds `rows`."""
    return next(bn for bn in SKINNY_TOKENS if rows <= bn)


def grid_clusters(tiles: int, resident: int) -> int:
    """Clusters of a launch: as many as the GPU holds at once (`resident`), never more than the
    product has tiles (each cluster takes whole tiles)."""
    return max(1, min(tiles, resident))


def k_steps(k: int) -> int:
    """The kernel's K steps (SK_BK * KSUB columns; the copy engine reads zeros past K)."""
    return -(-k // (SK_BK * KSUB))


# What a cluster of each size costs at the end of a launch, in K steps of the busiest block: the
# barrier across its SMs, the shares of a split tile added in rank order, the owner finishing late.
# Fitted to 12 products at 8 rows (qwen2.5-1.5b, qwen2.5-7b, llama-3.1-8b; H200, bench/NOTES.md #110):
# with it the rule below picks the fastest size for 11 and 0.7 us off it for qwen2.5-7b's down.
CLUSTER_END_STEPS = {2: 0.0, 4: 1.2, 8: 2.1}


def cluster_shape(tiles: int, steps: int, resident: dict[int, int]) -> tuple[int, int]:
    """(blocks a cluster, clusters) of a product of `tiles` tiles of `steps` K steps, given the
    clusters of each size the GPU holds at once. Each cluster takes whole tiles, so its busiest block
    streams ceil(ceil(tiles / C) x steps / size) steps; the size whose steps plus its end cost
    (CLUSTER_END_STEPS) are least. At 8 rows, us (H200): llama-3.1-8b's down (64 tiles of 56 steps:
    28 steps at 2 blocks a cluster, 42 at 4, 35 at 8) 29.6 / 36.6 / 33.3; qwen2.5-7b's qkv (72 tiles
    of 14 steps: 14 / 11 / 9) 14.7 / 13.7 / 13.4; qwen2.5-1.5b's o_proj (24 tiles of 6 steps: 3 / 2 / 2)
    3.6 / 4.2 / 5.0."""
    def cost(size):
        c = grid_clusters(tiles, resident[size])
        return -(-(-(-tiles // c) * steps) // size) + CLUSTER_END_STEPS[size], size
    size = min(resident, key=cost)
    return size, grid_clusters(tiles, resident[size])


def make_skinny(backend, num_sms: int, rows: tuple[int, int] | None):
    """The backend's SkinnyGemm for steps of rows[0]..rows[1] rows (None: $RVLLM_SKINNY_ROWS, else
    DEFAULT_ROWS), or None when that is off or the GPU is not sm_90 (wgmma and this use of the copy
    engine are sm_90a's)."""
    if rows is None:
        env = os.environ.get("RVLLM_SKINNY_ROWS")
        rows = parse_rows(env) if env else DEFAULT_ROWS
    lo, hi = rows
    if not hi or not nvrtc.compiles_for(FILE, nvrtc.device_cc()):
        return None
    return SkinnyGemm(backend, num_sms, max(1, lo), min(hi, SKINNY_TOKENS[-1]))


class SkinnyGemm:
    def __init__(self, backend, num_sms: int, min_rows: int, max_rows: int):
        self.ops = backend
        self.num_sms = num_sms
        self.min_rows, self.max_rows = min_rows, max_rows
        # bench/skinny_gemm.py's sweep and the tests' small grids: clusters, and blocks a cluster
        self.clusters_override: int | None = None
        self.cluster_size_override: int | None = None
        self._weight_maps: dict[tuple, bytes] = {}  # the weights' tensor maps, made once each
        self._resident: dict[tuple, int] = {}  # (kernel, shared memory, cluster size) -> clusters the GPU holds at once

    def _weight_map(self, weight) -> bytes:
        key = (weight.data.ptr, weight.shape, weight.dtype.str)
        found = self._weight_maps.get(key)
        if found is None:
            found = self._weight_maps[key] = tensor_map_2d(weight, SK_BM // 2, SK_BK)
        return found

    def _resident_clusters(self, kernel, smem: int, size: int) -> int:
        key = (id(kernel), smem, size)
        found = self._resident.get(key)
        if found is None:
            found = kernel.max_active_clusters((1, 1, size), (SK_THREADS,), smem, size)
            found = self._resident[key] = max(1, found or self.num_sms * BLOCKS_PER_SM // size)
        return found

    def fits(self, rows: int, k: int, weight, act=None, bias=None) -> bool:
        """Whether a product of `rows` rows and K = k by `weight` (and act, bias) is this kernel's."""
        n = weight.shape[0] // (2 if act == "silu_and_mul" else 1)
        tiles = -(-n // (SK_BM // 2 if act == "silu_and_mul" else SK_BM))
        total = tiles * k_steps(k)  # the kernel's iteration arithmetic is int: (total + 1) x (size + 1) < 2^31
        return (self.min_rows <= rows <= self.max_rows and k % 8 == 0 and k > 0
                and (total + 1) * (CLUSTER_SIZES[-1] + 1) < 2 ** 31
                and weight.flags.c_contiguous and weight.data.ptr % 16 == 0
                and (act is None or (bias is None and weight.shape[0] % 2 == 0)))

    def linear(self, x, weight, bias=None, act=None):
        """x [rows, K] (rows contiguous, 16-byte aligned) @ weight[N, K].T (+ bias), or with act
        "silu_and_mul" silu(x @ gate.T) * (x @ up.T) for weight = [gate; up]; None when the step or
        the shapes are not this kernel's."""
        rows, k = x.shape
        if (not self.fits(rows, k, weight, act, bias) or x.dtype != weight.dtype or x.strides[1] != x.itemsize
                or x.data.ptr % 16 or (x.strides[0] % 16 and rows > 1)):
            return None
        silu = act == "silu_and_mul"
        n_out = weight.shape[0] // 2 if silu else weight.shape[0]
        tiles = -(-n_out // (SK_BM // 2 if silu else SK_BM))
        bn = token_tile(rows)
        out = cp.empty((rows, n_out), dtype=weight.dtype)
        kernel = self.ops._kernel(FILE, f"skinny_gemm{'_silu' if silu else ''}_n{bn}")
        smem = smem_bytes(bn)
        self.ops._ensure_smem(kernel, smem)
        sizes = (self.cluster_size_override,) if self.cluster_size_override else CLUSTER_SIZES
        size, clusters = cluster_shape(tiles, k_steps(k), {s: self._resident_clusters(kernel, smem, s) for s in sizes})
        clusters = min(tiles, self.clusters_override or clusters)
        # The token rows' map is made per call (a few us of host time); in a CUDA graph it is part of
        # the captured launch and costs nothing at replay.
        kernel((1, 1, clusters * size), (SK_THREADS,),
               (out, tensor_map_2d(x, bn, SK_BK), self._weight_map(weight),
                bias if bias is not None else np.uint64(0), np.int32(rows), np.int32(n_out), np.int32(k_steps(k)),
                np.int32(tiles), np.int32(n_out if silu else 0)), shared_mem=smem, cluster=size)
        return out
