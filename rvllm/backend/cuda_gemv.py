"""Decode-sized linear layers on the GPU: the wrappers of kernels_cu/gemv.cu, gemv_rope.cu and gemv_tc.cu.

CudaBackend.linear, add_norm_linear, add_norm_qkv_rotary and add_norm_logits route steps of at
most `max_rows` token rows here (decode steps of 1 or 2 requests by default, DEFAULT_MAX_ROWS);
gemv.cu's kernels are compiled for 1, 2, 4 and 8 rows (the logits form for 1) and a step runs
the smallest that holds it. Steps past max_rows and up to `tc_max_rows` (off by default) run
gemv_tc.cu's tensor-core kernels, and up to `tc_square_max_rows` (8 by default) so do the plain
products with N <= K < 2N (o_proj); larger steps go to cuBLAS. A call the kernels cannot take (K not
a multiple of 8, or of 32 on tensor cores; unaligned rows, a bias with the SiLU form, too much
shared memory) returns None and the caller uses the general path.
"""
from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

ROW_BUCKETS = (1, 2, 4, 8)
MAX_ROWS = ROW_BUCKETS[-1]  # compiled for; CudaBackend(gemv_max_rows=...) or $RVLLM_GEMV_MAX_ROWS reach them all
# Steps of more rows go to cuBLAS by default. Each row multiplies every weight chunk again on CUDA
# cores, so from 4 rows these kernels lose to cuBLAS: H200, bench/op_times.py, us at 4 / 8 rows,
# qwen2.5-1.5b gate_up 26.5 / 45.5 against cuBLAS 19.9 / 19.9; end to end, 8 x 128/128 requests
# 2,125 -> 4,081 tok/s on cuBLAS (qwen2.5-7b 754 -> 1,691), while at 2 rows these still win (1,114
# against 965; 7b 453 against 421). bench/NOTES.md #56.
DEFAULT_MAX_ROWS = 2
# Steps of more rows than the CUDA-core kernels take, up to gemv_tc_max_rows (at most TC_MAX_ROWS),
# can run gemv_tc.cu (tensor cores: 8 tokens are the n of one mma, so a row costs no more arithmetic
# than the first), when K is a multiple of 32: $RVLLM_GEMV_TC_MAX_ROWS / CudaBackend(gemv_tc_max_rows=...).
# Off by default: it is correct (tests/test_kernels_gpu.py) but not faster than cuBLAS. H200, 8 rows,
# us per product (bench/op_times.py) against cuBLAS: qwen2.5-1.5b qkv 7.6 / 7.2, o_proj 4.0 / 4.9,
# gate_up 20.4 / 19.8, down 12.9 / 11.1; end to end within run-to-run noise of cuBLAS at 4 and 8
# requests (bench/NOTES.md #57, #59).
TC_MAX_ROWS = 8
DEFAULT_TC_MAX_ROWS = 0
# With those forms off, plain products (no norm prologue) whose K is at least N and under 2N --
# the presets' attention output projection -- still run gemv_tc.cu from 3 rows (and past max_rows)
# to tc_square_max_rows: $RVLLM_GEMV_TC_SQUARE_MAX_ROWS / CudaBackend(gemv_tc_square_max_rows=...),
# 0 turns it off.
# cuBLAS reads such a small matrix slowly (4.7 MB in 4.9-6.1 us at qwen2.5-1.5b's size, where a
# plain read of it takes 3.1), and gemv_tc.cu is ahead of it there. H200, us a product
# (bench/NOTES.md #104): qwen2.5-1.5b's o_proj 3.9 against 6.1 at 4 rows, 4.1 against 4.9 at
# 8; qwen2.5-7b's 9.2 against 10.8 at 8. Not the others (qwen2.5-1.5b, 8 rows): down (K >= 2N) took
# 13.0 against 11.2 (cuda_ksplit's K-slices take it); gate_up's SiLU form 19.5-20.6 against
# 19.4-20.1 for the norm kernel and cuBLAS; qkv's add_norm form 7.3-7.4 against 6.8-6.9 at its
# split (6.2 at 8 warps a tile), but taking qkv's add + norm would end the down projection's K-slice
# sums at those rows (fused_rows), which only the separate norm kernel reads. End to end, 128/128
# requests (medians of 3 runs): qwen2.5-1.5b 4 requests 2,298 -> 2,458 and 2,303 -> 2,400 output
# tok/s, 8 requests 4,568 -> 4,747 and 4,607 -> 4,793; qwen2.5-7b 4 requests 890 -> 922;
# llama-3.1-8b 865 -> 881.
# On sm_90 skinny_gemm.cu (cuda_skinny) takes 3-16-row products first, these included.
DEFAULT_TC_SQUARE_MAX_ROWS = TC_MAX_ROWS
_TC_STEPS_PER_STRETCH = 4  # GTC_U in gemv_tc.cu: 32-column K steps per lane per stretch
_MAX_WARPS = 8  # GEMV_MAX_WARPS in gemv.cu: warps of a block
_GEMV_STRETCH = 8  # U of gemv.cu's gemv forms: 16-byte chunks per lane per stretch (the SiLU form's ks is 1)
_NORM_CHUNKS = 4  # NORM_CHUNKS in gemv.cu: 16-byte chunks of a row each thread of the norm prologue holds
_MAX_SMEM = 200 * 1024  # the normed rows staged in shared memory (an H100 allows 227 KiB a block)
_SMEM_PER_SM = 228 * 1024  # an H100's (sm_80: 164 KiB; the occupancy then only errs high)


def _ptr(a):
    """A kernel pointer argument: the array, or NULL for None."""
    return a if a is not None else np.uint64(0)


def _aligned(x) -> bool:
    return x.data.ptr % 16 == 0 and (x.shape[0] == 1 or (x.strides[0] // x.itemsize) % 8 == 0)


def split_k(k: int, form: str) -> tuple[int, int, int]:
    """(ks, rpb, seg_chunks) for K = k and a kernel form ("gemv", "silu" or "rope"): ks warps share an
    output unit, each taking a segment of seg_chunks 16-byte chunks; rpb units side by side fill a
    block.

    gemv form: segments of about one stretch (32 lanes x U chunks), so that a warp's chain of
    dependent loads stays short, or, where K needs more than 8 such segments, of the fewest whole
    stretches that 8 warps cover. (Capping one-stretch segments at 8 warps left qwen2.5-7b's down
    projection, K = 18944, with 296-chunk segments: a second stretch 16% used.)
    SiLU form: one warp a unit (ks = 1): a unit split over warps ends with a block-wide barrier and
    a shared-memory sum, and there are always enough units (the intermediate size) to fill the GPU.
    H200, batch 1, the split-K sweep of bench/NOTES.md #55 (ks = 1 against one-stretch segments):
    qwen2.5-1.5b 834 -> 851 tok/s, qwen2.5-7b 242 -> 257, llama-3.1-8b 247 -> 254."""
    chunks = k // 8
    if form == "silu":
        ks = 1
    elif form == "rope":
        # gemv_rope.cu (qkv + rotary, two rows a unit): segments of at most 128 chunks a row, so a
        # warp holds about what the gemv form's does (8 loads a lane), one stretch at 1.5b-8b sizes,
        # requested before the PDL wait. H200, qwen2.5-1.5b's qkv (K = 1536) at batch 1: 3.89 us a
        # call at this split (2 warps a unit) against 4.79 at 4 warps (bench/NOTES.md #78).
        ks = min(_MAX_WARPS, max(1, -(-chunks // 128)))
    else:
        stretch = 32 * _GEMV_STRETCH
        per_segment = -(-chunks // (stretch * _MAX_WARPS))  # stretches a segment, at least 1
        ks = min(_MAX_WARPS, max(1, -(-chunks // (stretch * per_segment))))
    return ks, _MAX_WARPS // ks, -(-chunks // ks)


def silu_stretch_chunks(k: int) -> int:
    """U of the SiLU form for K = k: 16-byte chunks a lane takes from each of a unit's two rows per
    stretch. 4, or 3 where 3 takes a unit in as many stretches (so fewer lanes idle): at
    K = 1536 (192 chunks) two stretches of 96 instead of 128 + 64, the second half empty. H200,
    qwen2.5-1.5b batch 1, against 4: 902.5 / 903.0 tok/s against 891.0 / 893.0 (bench/NOTES.md #77).
    Where 3 needs more stretches (K = 3584: 5 against 4; K = 4096: 6 against 4) a unit would wait on
    one more load round trip."""
    chunks = k // 8
    return 3 if -(-chunks // 96) == -(-chunks // 128) else 4


def logits_stretch_chunks(k: int) -> int:
    """U of gemv.cu's logits form for K = k: 6 (in blocks resident 3 to an SM) where that takes a
    K segment in no more stretches than 8 does, else 8. At K = 1536 one 6-chunk stretch of 192
    chunks fills every lane where an 8-chunk one leaves 64 lanes' slots empty; the smaller stretch
    also fits 3 blocks an SM. H200, qwen2.5-1.5b's lm_head at 1 row: 112.2 -> 106.0-106.4 us a call
    (bench/NOTES.md #93). Segments are split_k's "gemv" ones, sized for 8-chunk stretches."""
    seg = split_k(k, "gemv")[2]
    return 6 if -(-seg // (32 * 6)) <= -(-seg // (32 * _GEMV_STRETCH)) else 8


# Block sizes (warps) the SiLU form may take instead of 8 (silu_block_warps).
SILU_BLOCK_WARPS = (7, 6, 5, 4)
# ... when the warp-slot time they waste is at least this much smaller than 8 warps'.
_SILU_BLOCK_MIN_GAIN = 0.03


def silu_block_warps(units: int, k: int, num_sms: int, resident) -> int:
    """Warps a block of the SiLU form (one warp a unit) for `units` output units and K = k;
    resident(warps) is how many such blocks an SM holds at once.

    The grid is one wave of resident blocks and every warp takes a unit a pass, so the launch costs
    about passes x warp slots of unit-times: where the last pass falls to a few warps, the rest idle
    through it. qwen2.5-1.5b's gate_up (8,960 units) on 132 SMs at 2 blocks of 8 warps an SM is 4.24
    passes, the last shared by a quarter of the warps (a session-20 clock probe saw its warps end
    from 13 to 18 us); 3 blocks of 6 warps make 3.77 passes, 10% less slot time. H200, batch 1:
    931-933 -> 947-948 tok/s; 7 and 5 warps, which this rule does not pick, 879 and 924. 8 warps
    stay unless another size saves at least _SILU_BLOCK_MIN_GAIN: qwen2.5-7b's 18,944 units tie at 6
    warps and ran 274 -> 252 tok/s there (bench/NOTES.md #88). Only sizes whose threads hold a row
    in the norm prologue (K <= 8 * NORM_CHUNKS * threads) count. The same count did not pick
    better sizes for the gemv form (NOTES #89), so split_k alone decides those. In bf16 the 1-row
    3-chunk build now fits 3 blocks of 8 warps an SM (80 registers, gemv.cu): 2.83 passes, which 6
    warps at 4 blocks only tie, so 8 stay (NOTES #94)."""
    def cost(warps: int) -> int:
        slots = num_sms * max(1, resident(warps)) * warps
        return -(-units // slots) * slots

    best, best_cost = _MAX_WARPS, cost(_MAX_WARPS)
    for warps in SILU_BLOCK_WARPS:
        if k <= 8 * _NORM_CHUNKS * 32 * warps and cost(warps) <= (1 - _SILU_BLOCK_MIN_GAIN) * best_cost:
            best, best_cost = warps, cost(warps)
    return best


def split_k_tc(k: int) -> tuple[int, int, int]:
    """(ks, rpb, seg_steps) of gemv_tc.cu for K = k (a multiple of 32): segments of at least two
    stretches of 32-column steps, so that a tile's 16 x 8 outputs are summed over few warps, and at
    most 8 warps a tile."""
    steps = k // 32
    ks = min(_MAX_WARPS, max(1, -(-steps // (2 * _TC_STEPS_PER_STRETCH))))
    return ks, _MAX_WARPS // ks, -(-steps // ks)


class SmallBatchGemv:
    def __init__(self, backend, max_rows: int, num_sms: int, tc_max_rows: int = 0, tc_square_max_rows: int = 0):
        self.ops = backend
        self.max_rows = min(max_rows, MAX_ROWS)
        self.tc_max_rows = min(tc_max_rows, TC_MAX_ROWS)
        self.tc_square_max_rows = min(tc_square_max_rows, TC_MAX_ROWS)
        self.num_sms = num_sms
        self._resident: dict = {}  # (kernel, threads, shared memory) -> blocks an SM holds at once
        self.rope_one_pass = True  # gemv_rope.cu only where one pass of the grid holds every unit (below)

    @property
    def fused_rows(self) -> int:
        """The most token rows a step may have for these kernels' add + norm forms to take it."""
        return max(self.max_rows, self.tc_max_rows)

    def _bucket(self, rows: int) -> int | None:
        if rows < 1 or rows > self.max_rows:
            return None
        return next(b for b in ROW_BUCKETS if b >= rows)

    def _tc(self, rows: int, k: int) -> bool:
        """Whether a step of `rows` rows goes to gemv_tc.cu: past the CUDA-core kernels' rows."""
        return self.max_rows < rows <= self.tc_max_rows and k % 32 == 0

    def _tc_square(self, rows: int, k: int, n: int) -> bool:
        """Whether a plain product of `rows` rows, K = k and N = n goes to gemv_tc.cu with its other
        forms off (DEFAULT_TC_SQUARE_MAX_ROWS): N <= K < 2N, past the CUDA-core kernels' rows and
        past 2 (the rows measured; with gemv_max_rows 0, 1-2 rows stay on cuBLAS, as that promises)."""
        return (max(self.max_rows, 2) < rows <= self.tc_square_max_rows and k % 32 == 0
                and n <= k < 2 * n)

    def _resident_blocks(self, kernel, threads: int, smem: int) -> int:
        """Blocks of `threads` threads an SM holds at once, by registers, threads and shared memory."""
        key = (id(kernel), threads, smem)
        resident = self._resident.get(key)
        if resident is None:
            regs = -(-int(kernel.attributes["num_regs"]) // 8) * 8
            static = int(kernel.attributes.get("shared_size_bytes", 0))
            resident = max(1, min(2048 // threads, 32, 65536 // (regs * threads),
                                  _SMEM_PER_SM // (smem + static + 1024)))
            self._resident[key] = resident
        return resident

    def _grid(self, kernel, units: int, k: int, form: str, smem: int) -> tuple[int, int, int, int]:
        """(blocks, threads, ks, seg_chunks) of a launch: blocks of ks * rpb warps (split_k; split_k_tc
        for the "tc" form, whose units are tiles; silu_block_warps for the SiLU form), at most as many
        as fit on the GPU at once."""
        ks, rpb, seg_chunks = split_k_tc(k) if form == "tc" else split_k(k, form)
        if form == "silu":
            rpb = silu_block_warps(units, k, self.num_sms, lambda w: self._resident_blocks(kernel, 32 * w, smem))
        threads = 32 * ks * rpb
        resident = self._resident_blocks(kernel, threads, smem)
        return max(1, min(-(-units // rpb), self.num_sms * resident)), threads, ks, seg_chunks

    def _launch(self, kernel, units: int, k: int, form: str, args: tuple, smem: int = 0) -> None:
        """Every block loops over passes of rpb units, so the norm prologue runs once per block, and
        a warp's next stretch is in flight while it multiplies the current one."""
        grid, threads, ks, seg_chunks = self._grid(kernel, units, k, form, smem)
        kernel((grid,), (threads,), args + (np.int32(ks), np.int32(seg_chunks)), shared_mem=smem)

    def linear(self, x, weight, bias=None):
        """x [rows, K] (rows contiguous) @ weight[N, K].T (+ bias) -> [rows, N], or None."""
        rows, k = x.shape
        n = weight.shape[0]
        m = self._bucket(rows)
        tc = m is None and (self._tc(rows, k) or self._tc_square(rows, k, n))
        if (m is None and not tc) or k % 8 or not _aligned(x) or not _aligned(weight) or not weight.flags.c_contiguous:
            return None
        out = cp.empty((rows, n), dtype=weight.dtype)
        args = (out, x, np.int64(x.strides[0] // x.itemsize), weight, _ptr(bias), np.int32(rows), np.int32(n),
                np.int32(k))
        if tc:
            self._launch(self.ops._kernel("gemv_tc.cu", "gemv_tc"), -(-n // 16), k, "tc", args)
        else:
            self._launch(self.ops._kernel("gemv.cu", f"gemv_m{m}"), n, k, "gemv", args)
        return out

    @staticmethod
    def _norm_rows_fit(x, residual, weight, smem: int) -> bool:
        """Whether the add + norm prologue can stage x (+ residual) in `smem` bytes and stream weight."""
        return (x.shape[1] % 8 == 0 and smem <= _MAX_SMEM and x.flags.c_contiguous and weight.flags.c_contiguous
                and _aligned(weight) and _aligned(x)
                and (residual is None or (residual.flags.c_contiguous and _aligned(residual))))

    def add_norm_linear(self, x, residual, norm_weight, eps: float, weight, bias=None, act=None):
        """backend/fused.py's add_norm_linear in one kernel, or None."""
        rows, k = x.shape
        m = self._bucket(rows)
        tc = m is None and self._tc(rows, k)
        if tc:  # the tensor-core kernels stage 8 rows (GTC_ROWS)
            smem = TC_MAX_ROWS * k * x.itemsize
            ks, rpb, _ = split_k_tc(k)
        else:
            smem = m * k * x.itemsize if m else 0
            ks, rpb, _ = split_k(k, "silu" if act == "silu_and_mul" else "gemv")
        if ((m is None and not tc) or not self._norm_rows_fit(x, residual, weight, smem)
                or (not tc and k > 8 * _NORM_CHUNKS * 32 * ks * rpb) or (act is not None and bias is not None)):
            return None
        n = weight.shape[0]
        s_out = None if residual is None else cp.empty_like(x)  # None: x is the residual stream, unchanged
        if act == "silu_and_mul":
            inter = n // 2
            out = cp.empty((rows, inter), dtype=weight.dtype)
            if tc:
                kernel, units, form = self.ops._kernel("gemv_tc.cu", "add_norm_gemv_silu_tc"), -(-inter // 8), "tc"
            else:
                u3 = m <= 2 and silu_stretch_chunks(k) == 3  # compiled for 1-2 rows only (gemv.cu)
                name = f"add_norm_gemv_silu{'_u3' if u3 else ''}_m{m}"
                kernel, units, form = self.ops._kernel("gemv.cu", name), inter, "silu"
            self.ops._ensure_smem(kernel, smem)
            self._launch(kernel, units, k, form,
                         (out, _ptr(s_out), x, _ptr(residual), norm_weight, np.float32(eps), weight,
                          np.int32(rows), np.int32(inter), np.int32(k)), smem)
        else:
            out = cp.empty((rows, n), dtype=weight.dtype)
            if tc:
                kernel, units, form = self.ops._kernel("gemv_tc.cu", "add_norm_gemv_tc"), -(-n // 16), "tc"
            else:
                kernel, units, form = self.ops._kernel("gemv.cu", f"add_norm_gemv_m{m}"), n, "gemv"
            self.ops._ensure_smem(kernel, smem)
            self._launch(kernel, units, k, form,
                         (out, _ptr(s_out), x, _ptr(residual), norm_weight, np.float32(eps), weight, _ptr(bias),
                          np.int32(rows), np.int32(n), np.int32(k)), smem)
        return out, (x if s_out is None else s_out)

    def add_norm_logits(self, x, residual, norm_weight, eps: float, lm_head, out):
        """out [1, V] float32 = rms_norm(x + residual) @ lm_head.T in one kernel (gemv.cu's
        add_norm_logits, 1 row), or None. The caller has checked the shapes. At 2 rows this form
        lost to the norm kernel and cuBLAS (H200, qwen2.5-1.5b: 135 against 114-118 us), so only
        1-row steps (batch-1 decoding) take it."""
        rows, k = x.shape
        smem = k * x.itemsize
        ks, rpb, _ = split_k(k, "gemv")
        if (self._bucket(rows) != 1 or not self._norm_rows_fit(x, residual, lm_head, smem)
                or k > 8 * _NORM_CHUNKS * 32 * ks * rpb):
            return None
        u6 = logits_stretch_chunks(k) == 6
        kernel = self.ops._kernel("gemv.cu", f"add_norm_logits{'_u6' if u6 else ''}_m1")
        self.ops._ensure_smem(kernel, smem)
        n = lm_head.shape[0]
        self._launch(kernel, n, k, "gemv", (out, x, _ptr(residual), norm_weight, np.float32(eps), lm_head,
                                            np.int32(rows), np.int32(n), np.int32(k)), smem)
        return out

    def add_norm_qkv_rotary(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                            k_cache, v_cache, slot_mapping, neox: bool):
        """backend/fused.py's add_norm_qkv_rotary in one kernel (gemv_rope.cu: the product streamed two
        rows a unit, as the SiLU form's, a unit being one rotation pair of a head; K split as
        split_k's "rope"), or None: built for 1-2 rows, the steps this class takes by default. The
        caller has checked the rotary inputs."""
        rows, k = x.shape
        nh, nkv, hd = heads
        m = self._bucket(rows)
        smem = (m or 0) * k * x.itemsize
        ks, rpb, seg_chunks = split_k(k, "rope")
        half = hd // 2
        if (m is None or m > 2 or hd % 2 or half & (half - 1) or weight.shape[0] != (nh + 2 * nkv) * hd
                or not self._norm_rows_fit(x, residual, weight, smem) or k > 8 * _NORM_CHUNKS * 32 * ks * rpb):
            return None
        units = (nh + 2 * nkv) * half
        name = f"add_norm_gemv_rope{'_u3' if silu_stretch_chunks(8 * seg_chunks) == 3 else ''}_m{m}"  # a segment's
        kernel = self.ops._kernel("gemv_rope.cu", name)
        if self.rope_one_pass and self._grid(kernel, units, k, "rope", smem)[0] * rpb < units:
            # More units than one pass of the grid: each later one costs its warp more than the
            # separate rotary kernel saves (H200, qwen2.5-7b's qkv, 5 passes: 12.8 us a call against
            # 12.45 for the two kernels; qwen2.5-1.5b, one pass: 3.89 against 4.89; NOTES #78).
            return None
        s_out = None if residual is None else cp.empty_like(x)
        q_out = cp.empty((rows, nh, hd), dtype=weight.dtype)
        self.ops._ensure_smem(kernel, smem)
        self._launch(kernel, units, k, "rope",
                     (q_out, _ptr(s_out), x, _ptr(residual), norm_weight, np.float32(eps), weight, _ptr(bias),
                      np.int32(rows), np.int32(units), np.int32(k), k_cache, v_cache, positions,
                      slot_mapping, cos_sin, np.int32(cos_sin.shape[0]), np.int32(nh), np.int32(nkv),
                      np.int32(half.bit_length() - 1),
                      np.int32(1 if neox else 0)), smem)
        return q_out, (x if s_out is None else s_out)
