"""Products of decode steps of 3-16 token rows on Hopper: the wrapper of kernels_cu/skinny_gemm.cu.

Off by default (DEFAULT_ROWS, below). Turned on, CudaBackend.linear and add_norm_linear (after the
norm kernel; the SiLU form too) route steps of `min_rows`..`max_rows` rows past gemv.cu's here on
compute capability 9.0; other GPUs, and shapes the copy engine
cannot take (K not a multiple of 8, rows not 16-byte aligned), stay on the other paths. The weights
stream through shared memory by the bulk tensor copy engine and the tokens are wgmma's n (8 or 16);
the product's 64-column K steps are shared out evenly over about two blocks an SM, and tiles split
between blocks are summed in block order (see the kernel file).
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
SK_THREADS = 128 + 32  # a warpgroup multiplies, a warp issues the copies
SK_STAGES = {8: 8, 16: 8}  # by token tile: SK_STAGES_N8, SK_STAGES_N16
MAX_TILES = 8192  # counters kept: output tiles of 64 rows (a 524,288-row product)
BLOCKS_PER_SM = 2  # the kernel's launch bounds; ~77-87 KiB of shared memory a block
# Steps of DEFAULT_ROWS[0]..DEFAULT_ROWS[1] rows take these kernels (CudaBackend(skinny_rows=...),
# $RVLLM_SKINNY_ROWS="lo-hi", e.g. "3-16"); (0, 0), the default, leaves them off: correct
# (tests/test_kernels_gpu.py) but slower than the paths they would replace. H200, qwen2.5-1.5b at 8
# rows, us a call (bench/skinny_gemm.py: graphs of 40 calls; the norm kernel counted where named),
# this kernel at 264 blocks against cuBLAS (and its norm and SiLU kernels): add_norm + qkv 8.7 / 7.2,
# o_proj 7.5 / 4.8, add_norm + gate_up + SiLU 20.8 / 19.4, down 13.2 / 10.7. 128/128 requests, output
# tok/s, on / off: 8 of them 4,354 / 4,858, 16 of them 7,124 / 8,895. A copy that skips the hand-over
# of split tiles (wrong sums; timing only) took 5.1 / 3.3 / 16.9 / 8.7 us, ahead of every default
# path: the weights stream at ~4.2 TB/s, and the ~3.5-4 us a launch is the hand-over (partials,
# fence, counter, the last block's reads) at the end of every block. bench/NOTES.md #108 says what
# was tried and what is next.
DEFAULT_ROWS = (0, 0)


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
    64 columns, plus the slack that aligns the first tile to 1024 bytes."""
    return SK_STAGES[bn] * (SK_BM + bn) * SK_BK * 2 + 1024


def token_tile(rows: int) -> int:
    """The smallest token tile (wgmma's n) that holds `rows`."""
    return next(bn for bn in SKINNY_TOKENS if rows <= bn)


def grid_blocks(iterations: int, num_sms: int) -> int:
    """Blocks of a launch: two an SM, never more than the product has K steps (no empty block)."""
    return max(1, min(iterations, BLOCKS_PER_SM * num_sms))


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
        self.blocks_override: int | None = None  # bench/op sweeps and the tests' uneven splits
        self._weight_maps: dict[tuple, bytes] = {}  # the weights' tensor maps, made once each
        # Partial sums of split tiles (two slots a block, 64 x 16 floats each) and a counter a tile,
        # which the last block of a tile resets: made once, so CUDA graphs capture fixed addresses.
        self.max_blocks = 4 * num_sms
        self._ws = cp.empty(self.max_blocks * 2 * SK_BM * SKINNY_TOKENS[-1], dtype=np.float32)
        self._counters = cp.zeros(MAX_TILES, dtype=np.int32)

    def _weight_map(self, weight) -> bytes:
        key = (weight.data.ptr, weight.shape, weight.dtype.str)
        found = self._weight_maps.get(key)
        if found is None:
            found = self._weight_maps[key] = tensor_map_2d(weight, SK_BM // 2, SK_BK)
        return found

    def fits(self, rows: int, k: int, weight, act=None, bias=None) -> bool:
        """Whether a product of `rows` rows and K = k by `weight` (and act, bias) is this kernel's."""
        n = weight.shape[0] // (2 if act == "silu_and_mul" else 1)
        tiles = -(-n // (SK_BM // 2 if act == "silu_and_mul" else SK_BM))
        total = tiles * -(-k // SK_BK)  # the kernel's iteration arithmetic is int: (total + 1) x (blocks + 1) < 2^31
        return (self.min_rows <= rows <= self.max_rows and k % 8 == 0 and k > 0 and tiles <= MAX_TILES
                and (total + 1) * (self.max_blocks + 1) < 2 ** 31
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
        k_steps = -(-k // SK_BK)
        blocks = self.blocks_override or grid_blocks(tiles * k_steps, self.num_sms)
        blocks = max(1, min(blocks, tiles * k_steps, self.max_blocks))
        bn = token_tile(rows)
        out = cp.empty((rows, n_out), dtype=weight.dtype)
        kernel = self.ops._kernel(FILE, f"skinny_gemm{'_silu' if silu else ''}_n{bn}")
        smem = smem_bytes(bn)
        self.ops._ensure_smem(kernel, smem)
        # The token rows' map is made per call (a few us of host time); in a CUDA graph it is part of
        # the captured launch and costs nothing at replay.
        kernel((blocks,), (SK_THREADS,),
               (out, self._ws, self._counters, tensor_map_2d(x, bn, SK_BK), self._weight_map(weight),
                bias if bias is not None else np.uint64(0), np.int32(rows), np.int32(n_out), np.int32(k_steps),
                np.int32(tiles), np.int32(n_out if silu else 0)), shared_mem=smem)
        return out
