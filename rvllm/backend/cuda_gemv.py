"""Decode-sized linear layers on the GPU: the wrappers of kernels_cu/gemv.cu.

CudaBackend.linear and CudaBackend.add_norm_linear route steps of at most `max_rows` token rows
here (decode steps of up to 8 requests); larger steps go to cuBLAS. The kernels are compiled for
1, 2, 4 and 8 rows; a step runs the smallest that holds it. A call the kernels cannot take (K not
a multiple of 8, unaligned rows, a bias with the SiLU form, too much shared memory) returns None
and the caller uses the general path.
"""
from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

ROW_BUCKETS = (1, 2, 4, 8)
MAX_ROWS = ROW_BUCKETS[-1]
_MAX_WARPS = 8  # GEMV_MAX_WARPS in gemv.cu: warps of a block
_STRETCH = {"gemv": 8, "silu": 4}  # U in gemv.cu: 16-byte chunks per lane per stretch (R = 1 / R = 2 rows)
_MAX_SMEM = 200 * 1024  # the normed rows staged in shared memory (an H100 allows 227 KiB a block)
_SMEM_PER_SM = 228 * 1024  # an H100's (sm_80: 164 KiB; the occupancy then only errs high)


def _ptr(a):
    """A kernel pointer argument: the array, or NULL for None."""
    return a if a is not None else np.uint64(0)


def _aligned(x) -> bool:
    return x.data.ptr % 16 == 0 and (x.shape[0] == 1 or (x.strides[0] // x.itemsize) % 8 == 0)


def split_k(k: int, stretch: int) -> tuple[int, int, int]:
    """(ks, rpb, seg_chunks) for K = k: ks warps share an output unit, each taking a segment of
    seg_chunks 16-byte chunks, so that a segment is about one stretch (32 lanes x `stretch` chunks)
    and a warp's chain of dependent loads stays short; rpb units side by side fill a block."""
    chunks = k // 8
    ks = min(_MAX_WARPS, max(1, -(-chunks // (32 * stretch))))
    return ks, _MAX_WARPS // ks, -(-chunks // ks)


def prefetch_plan(part_bytes: int, pass_bytes: int, parts: int, budget: int, stride: int):
    """l2_prefetch_kernel's ranges for a product that reads `parts` parts of `part_bytes` bytes (the
    SiLU form's gate and up rows: 2), each pass of its blocks `pass_bytes` of every part:
    (chunk, step, chunks, part_bytes), i.e. chunks of `chunk` bytes at 0, step, 2 step, ... of each
    part, at most `budget` bytes in all, every chunk inside its part; None when nothing fits."""
    per_part = min(budget // parts, part_bytes)
    chunk = min(pass_bytes, per_part) // 16 * 16  # the bulk prefetch takes multiples of 16 bytes
    if chunk < 16 or stride < 1:
        return None
    step = stride * pass_bytes
    chunks = min((part_bytes - chunk) // step + 1, per_part // chunk)
    return chunk, step, chunks, part_bytes


class SmallBatchGemv:
    def __init__(self, backend, max_rows: int, num_sms: int):
        self.ops = backend
        self.max_rows = min(max_rows, MAX_ROWS)
        self.num_sms = num_sms
        self._resident: dict = {}  # (kernel, threads, shared memory) -> blocks an SM holds at once

    def _bucket(self, rows: int) -> int | None:
        if rows < 1 or rows > self.max_rows:
            return None
        return next(b for b in ROW_BUCKETS if b >= rows)

    def _geometry(self, kernel, units: int, k: int, form: str, smem: int) -> tuple[int, int, int, int]:
        """(grid, threads, ks, seg_chunks): blocks of ks * rpb warps (split_k), at most as many as
        fit on the GPU at once; each block loops over passes of rpb units."""
        ks, rpb, seg_chunks = split_k(k, _STRETCH[form])
        threads = 32 * ks * rpb
        key = (id(kernel), threads, smem)
        resident = self._resident.get(key)
        if resident is None:
            regs = -(-int(kernel.attributes["num_regs"]) // 8) * 8
            static = int(kernel.attributes.get("shared_size_bytes", 0))
            resident = max(1, min(2048 // threads, 32, 65536 // (regs * threads),
                                  _SMEM_PER_SM // (smem + static + 1024)))
            self._resident[key] = resident
        return max(1, min(-(-units // rpb), self.num_sms * resident)), threads, ks, seg_chunks

    def _launch(self, kernel, units: int, k: int, form: str, args: tuple, smem: int = 0) -> None:
        """One block per resident slot: each loops over passes of units, so the norm prologue runs
        once per block, and a warp's next stretch is in flight while it multiplies the current one."""
        grid, threads, ks, seg_chunks = self._geometry(kernel, units, k, form, smem)
        kernel((grid,), (threads,), args + (np.int32(ks), np.int32(seg_chunks)), shared_mem=smem)

    def prefetch(self, weight, rows: int, act=None, budget: int = 0, stride: int = 2, evict_last: bool = False,
                 bulk: bool = True, blocks: int = 8) -> bool:
        """Starts about `budget` bytes of `weight` towards L2 for the add_norm_linear of `rows` rows
        (with `act`) that reads it later; False when that product will not run here or nothing fits.

        Which bytes: whole passes of the product's blocks (every block reads units p * grid * rpb
        onwards in pass p), one pass in every `stride` from the first. With stride 2 a warp's two
        stretches in flight are one pass from L2 and one from DRAM, so DRAM stays busy while the
        prefetched passes are read; stride 1 prefetches the first passes outright. For the SiLU
        form the gate rows and the up rows of each pass are both taken."""
        m = self._bucket(rows)
        k = weight.shape[1]
        smem = m * k * weight.itemsize if m else 0
        if (m is None or budget <= 0 or k % 8 or smem > _MAX_SMEM or not weight.flags.c_contiguous
                or not _aligned(weight)):
            return False
        silu = act == "silu_and_mul"
        form = "silu" if silu else "gemv"
        units = weight.shape[0] // 2 if silu else weight.shape[0]
        kernel = self.ops._kernel("gemv.cu", f"add_norm_gemv_silu_m{m}" if silu else f"add_norm_gemv_m{m}")
        self.ops._ensure_smem(kernel, smem)
        grid, threads, ks, _ = self._geometry(kernel, units, k, form, smem)
        parts = 2 if silu else 1
        pass_units = grid * (threads // 32 // ks)  # grid * rpb
        plan = prefetch_plan(units * k * weight.itemsize, pass_units * k * weight.itemsize, parts, budget, stride)
        if plan is None:
            return False
        chunk, step, chunks, total = plan
        self.ops._kernel("gemv.cu", "l2_prefetch_kernel")(
            (max(1, blocks), parts), (128,),
            (weight, np.int64(chunk), np.int64(step), np.int32(chunks), np.int64(total),
             np.int32(1 if evict_last else 0), np.int32(1 if bulk else 0)))
        return True

    def linear(self, x, weight, bias=None):
        """x [rows, K] (rows contiguous) @ weight[N, K].T (+ bias) -> [rows, N], or None."""
        rows, k = x.shape
        m = self._bucket(rows)
        if m is None or k % 8 or not _aligned(x) or not _aligned(weight) or not weight.flags.c_contiguous:
            return None
        n = weight.shape[0]
        out = cp.empty((rows, n), dtype=weight.dtype)
        kernel = self.ops._kernel("gemv.cu", f"gemv_m{m}")
        self._launch(kernel, n, k, "gemv",
                     (out, x, np.int64(x.strides[0] // x.itemsize), weight, _ptr(bias), np.int32(rows), np.int32(n),
                      np.int32(k)))
        return out

    def add_norm_linear(self, x, residual, norm_weight, eps: float, weight, bias=None, act=None):
        """backend/fused.py's add_norm_linear in one kernel, or None."""
        rows, k = x.shape
        m = self._bucket(rows)
        smem = m * k * x.itemsize if m else 0
        if (m is None or k % 8 or smem > _MAX_SMEM or not x.flags.c_contiguous or not weight.flags.c_contiguous
                or (residual is not None and not residual.flags.c_contiguous) or not _aligned(weight)
                or (act is not None and bias is not None)):
            return None
        n = weight.shape[0]
        s_out = None if residual is None else cp.empty_like(x)  # None: x is the residual stream, unchanged
        if act == "silu_and_mul":
            inter = n // 2
            out = cp.empty((rows, inter), dtype=weight.dtype)
            kernel = self.ops._kernel("gemv.cu", f"add_norm_gemv_silu_m{m}")
            self.ops._ensure_smem(kernel, smem)
            self._launch(kernel, inter, k, "silu",
                         (out, _ptr(s_out), x, _ptr(residual), norm_weight, np.float32(eps), weight,
                          np.int32(rows), np.int32(inter), np.int32(k)), smem)
        else:
            out = cp.empty((rows, n), dtype=weight.dtype)
            kernel = self.ops._kernel("gemv.cu", f"add_norm_gemv_m{m}")
            self.ops._ensure_smem(kernel, smem)
            self._launch(kernel, n, k, "gemv",
                         (out, _ptr(s_out), x, _ptr(residual), norm_weight, np.float32(eps), weight, _ptr(bias),
                          np.int32(rows), np.int32(n), np.int32(k)), smem)
        return out, (x if s_out is None else s_out)
