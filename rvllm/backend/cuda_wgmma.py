"""Decode-sized matrix products on Hopper's wgmma: the wrapper of kernels_cu/gemm_wgmma.cu.

CudaBackend.linear (and the product after the norm in add_norm_linear) routes steps of
`min_rows`..`max_rows` token rows here on compute capability 9.0 when the shapes fit (N a multiple
of 128, K of 64, 16-byte aligned rows); everything else, and every GPU but sm_90, stays on cuBLAS.
The token rows are wgmma's n: a block multiplies 128 weight rows by a tile of up to 256 tokens, and
K is split over `splits` blocks when the output tiles alone would leave SMs idle, their fp32 sums
added in a fixed order by gemm_wgmma_reduce (see the kernel file).
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

# gemm_wgmma.cu's entry points: (token tile, stages). Must match its GEMM_WGMMA_ENTRY lines.
WGMMA_BUILDS = ((64, 8), (128, 6), (256, 4))
WG_BM, WG_BK, WG_THREADS = 128, 64, 256
MAX_SPLITS = 16
_MIN_K_TILES_PER_SPLIT = 4  # a split shorter than the pipeline's depth is mostly its fill
# Steps of DEFAULT_ROWS[0]..DEFAULT_ROWS[1] rows take these kernels by default (CudaBackend(wgmma_rows=...),
# $RVLLM_WGMMA_ROWS="lo-hi"); (0, 0) leaves every product on cuBLAS. Off: correct (tests/test_kernels_gpu.py)
# but slower than cuBLAS at every decode shape measured. H200, bench/gemm_wgmma.py, us, this wrapper's
# choice against cuBLAS: qwen2.5-1.5b at 256 rows qkv 12.3 / 5.5, o 9.4 / 5.5, gate_up 40.6 / 22.1, down
# 21.5 / 18.1; at 64 rows 6.4 / 5.2, 5.6 / 5.0, 22.4 / 17.0, 12.1 / 11.2. The best token tile and split
# per shape reach cuBLAS at most (down at 256 rows 18.0 / 18.1). bench/NOTES.md #69-#71 say what is missing.
DEFAULT_ROWS = (0, 0)


def parse_rows(text: str) -> tuple[int, int]:
    """$RVLLM_WGMMA_ROWS ("lo-hi", e.g. "16-256"; "0-0" off) as (lo, hi)."""
    parts = text.split("-")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) > int(parts[1]):
        raise ValueError(f"RVLLM_WGMMA_ROWS must be 'lo-hi' with lo <= hi (e.g. 16-256, or 0-0 for off), got {text!r}")
    return int(parts[0]), int(parts[1])


def smem_bytes(bn: int, stages: int) -> int:
    """Dynamic shared memory of the build: its stages of 128 weight rows and bn token rows of 64
    columns, plus the slack that aligns the first tile to 1024 bytes."""
    return stages * (WG_BM + bn) * WG_BK * 2 + 1024


def token_tile(rows: int) -> tuple[int, int]:
    """(bn, stages) of the build for a step of `rows` rows: the smallest tile that holds them, else
    the largest (several token tiles)."""
    for bn, stages in WGMMA_BUILDS:
        if rows <= bn:
            return bn, stages
    return WGMMA_BUILDS[-1]


def choose_splits(tiles: int, k_tiles: int, num_sms: int) -> int:
    """Blocks that share an output tile: as many as keep all tiles x splits blocks in one wave of
    the GPU (one block an SM) with at least _MIN_K_TILES_PER_SPLIT K tiles each, at most
    MAX_SPLITS; 1 when the tiles alone fill the GPU."""
    s = max(1, min(MAX_SPLITS, num_sms // max(1, tiles), k_tiles // _MIN_K_TILES_PER_SPLIT))
    kps = -(-k_tiles // s)
    return -(-k_tiles // kps)  # no split left without K tiles


def make_wgmma(backend, num_sms: int, rows: tuple[int, int] | None):
    """The backend's WgmmaGemm for steps of rows[0]..rows[1] rows (None: $RVLLM_WGMMA_ROWS, else
    DEFAULT_ROWS), or None when that is off or the GPU is not sm_90 (wgmma is sm_90a's own
    instruction: sm_80 and sm_100 keep cuBLAS)."""
    if rows is None:
        env = os.environ.get("RVLLM_WGMMA_ROWS")
        rows = parse_rows(env) if env else DEFAULT_ROWS
    lo, hi = rows
    if not hi or not nvrtc.compiles_for("gemm_wgmma.cu", nvrtc.device_cc()):
        return None
    return WgmmaGemm(backend, num_sms, lo, hi)


class WgmmaGemm:
    def __init__(self, backend, num_sms: int, min_rows: int, max_rows: int):
        self.ops = backend
        self.num_sms = num_sms
        self.min_rows, self.max_rows = min_rows, max_rows
        self.splits_override: int | None = None  # bench/gemm_wgmma.py's sweep
        self.tile_override: int | None = None  # the same, for the token tile (a build's bn)
        self._weight_maps: dict[tuple, bytes] = {}  # the weights' tensor maps, made once each

    def _weight_map(self, weight) -> bytes:
        key = (weight.data.ptr, weight.shape, weight.dtype.str)
        found = self._weight_maps.get(key)
        if found is None:
            found = self._weight_maps[key] = tensor_map_2d(weight, WG_BM, WG_BK)
        return found

    def fits(self, x, weight) -> bool:
        rows, k = x.shape
        n = weight.shape[0]
        return (self.min_rows <= rows <= self.max_rows and n % WG_BM == 0 and k % WG_BK == 0
                and weight.flags.c_contiguous and weight.data.ptr % 16 == 0 and x.data.ptr % 16 == 0
                and x.strides[1] == x.itemsize and (x.strides[0] // x.itemsize) % 8 == 0 and x.dtype == weight.dtype)

    def linear(self, x, weight, bias=None):
        """x [rows, K] (rows contiguous) @ weight[N, K].T (+ bias) -> [rows, N], or None when the
        step or the shapes are not this kernel's."""
        if not self.fits(x, weight):
            return None
        rows, k = x.shape
        n = weight.shape[0]
        if self.tile_override is None:
            bn, stages = token_tile(rows)
        else:
            bn, stages = self.tile_override, dict(WGMMA_BUILDS)[self.tile_override]
        tiles_n, tiles_t, k_tiles = n // WG_BM, -(-rows // bn), k // WG_BK
        splits = self.splits_override or choose_splits(tiles_n * tiles_t, k_tiles, self.num_sms)
        splits = max(1, min(splits, k_tiles))
        kps = -(-k_tiles // splits)
        splits = -(-k_tiles // kps)
        out = cp.empty((rows, n), dtype=weight.dtype)
        ws = cp.empty((splits, rows, n), dtype=np.float32) if splits > 1 else None
        kernel = self.ops._kernel("gemm_wgmma.cu", f"gemm_wgmma_n{bn}")
        smem = smem_bytes(bn, stages)
        self.ops._ensure_smem(kernel, smem)
        bias_arg = bias if bias is not None else np.uint64(0)
        # The token rows' map is made per call (a few us of host time); in a CUDA graph it is part of
        # the captured launch and costs nothing at replay.
        kernel((tiles_n, tiles_t, splits), (WG_THREADS,),
               (out, ws if ws is not None else np.uint64(0), tensor_map_2d(x, bn, WG_BK), self._weight_map(weight),
                bias_arg, np.int32(rows), np.int32(n), np.int32(k), np.int32(kps)), shared_mem=smem)
        if ws is not None:
            quads = rows * n // 4
            grid = max(1, min(-(-quads // 256), 8 * self.num_sms))
            self.ops._kernel("gemm_wgmma.cu", "gemm_wgmma_reduce")(
                (grid,), (256,), (out, ws, bias_arg, np.int32(rows), np.int32(n), np.int32(splits)))
        return out
