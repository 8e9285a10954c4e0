"""Paged attention on the GPU: which kernel a step gets, and the wrappers of
kernels_cu/attention_decode.cu (split-context "flash-decoding") and attention_prefill.cu (tensor
cores); cuda_decode_tc.py launches attention_decode_tc.cu (decode on tensor cores).
CudaBackend.paged_attention calls the functions here; backend/cpu.py is the reference semantics.
cuda_rotary.py writes the KV cache that they read.

Two ways to run the decode kernel:
- eager (the default): scratch allocated per call and one block per partition of the longest
  context in the step (`meta.max_seq_len`);
- fixed (`meta.decode_workspace` is a DecodeWorkspace): preallocated scratch, a grid that depends
  only on the shapes, and the block table's row stride read on the device. Nothing then depends on
  host values that change between steps, so the launch can be captured in a CUDA graph and
  replayed for any context up to `DecodeWorkspace.max_context`.
The tensor-core decode kernel needs no scratch (in a fixed step it takes only the row stride from
the workspace) except its build split over the context, which takes the workspace's scratch and
counters as the split kernel does (its cluster form, on sm_90, needs neither). decode_build says which
kernel a step gets.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from rvllm.backend import cuda_decode_tc, nvrtc
from rvllm.backend.cuda_rotary import check_cache

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

MAX_GRID_YZ = 65535
# Fixed-grid decode: aim for this many blocks per multiprocessor (the blocks loop over partitions).
_BLOCKS_PER_SM = 4
_KEYS_IN_FLIGHT = 8  # per warp (attention_decode.cu): a partition of warps x 8 keys is one load per warp
# The wide build (16 warps) for steps of at most this many (row, KV head) pairs (batch 1-4 at 2 KV
# heads), or of fewer than _WIDE_MAX_PAIRS_PER_SM per SM, where the tensor-core kernel takes over
# (bench/NOTES.md #32, #34: at 16-32 rows of 2 KV heads the wide build beat the 128-thread one).
_WIDE_MAX_PAIRS = 8
_WIDE_MAX_PAIRS_PER_SM = float(os.environ.get("RVLLM_DECODE_WIDE_MAX_PAIRS_PER_SM", "0.5"))
# The tensor-core kernel (a block per (row, KV head) pair, no split over blocks) from this many
# pairs per SM. Below it attention_decode.cu's builds, which split long contexts over blocks, win:
# on an H200 at 32 rows x 2 KV heads (0.48 pairs per SM) and 1024 keys the two tie (35.4 us).
_TC_MIN_PAIRS_PER_SM = float(os.environ.get("RVLLM_DECODE_TC_MIN_PAIRS_PER_SM", "0.5"))
# ... and at any step size when no context of the step is longer than this many tokens (0: off);
# CUDA graphs then capture a second graph for the buckets this changes (runner/graphs.py). Off
# until session 11: it gained qwen2.5-1.5b at batch 1 0.7% and cost qwen2.5-7b 11.6% (bench/NOTES.md
# #41), because the kernel's shared-memory carveout differed from the GEMVs' around it (#50). With
# DECODE_TC_ONE_PER_SM's carveout, H200, batch 1: 1.5b 753.6 -> 803.3 tok/s, 7b 234.0 -> 238.7.
TC_SHORT_CONTEXT = int(os.environ.get("RVLLM_DECODE_TC_SHORT_CONTEXT", "192"))
# RVLLM_DECODE_ROPE=1 (an experiment setting, off by default): decode steps that run the
# tensor-core kernel with more than one (row, KV head) pair per SM take rotary and the KV-cache
# write into it (its rope builds, decode_rope) instead of the rotary kernel. H200, qwen2.5-1.5b
# (bench/NOTES.md #79): bench/op_times.py's qkv + rotary + attention at 256 rows 29.0 -> 27.9 us, at
# 128 rows 18.3 -> 17.7; a real 256-way run's layer chain 0.57 us shorter, but its decode steps no
# shorter (the gaps around the kernel grew) and 256 x 128/128 within run-to-run noise, so it stays off.
DECODE_ROPE = os.environ.get("RVLLM_DECODE_ROPE", "0") == "1"
# ... and on the one-pair-per-SM build too (not even per op: 64 rows 14.4 -> 14.5 us, 8 rows 13.0 ->
# 13.2; qwen2.5-7b at batch 1 269.4 -> 268.0 tok/s). The tests turn both on.
DECODE_ROPE_ONE_PER_SM = False


# attention_decode_tc.cu's entry points: name -> (warps per pair, keys per tile, tiles in flight per warp)
DECODE_TC_BUILDS = {nvrtc.decode_tc_kernel(*b): b for b in nvrtc.DECODE_TC_BUILDS}
DECODE_TC_ONE_PER_SM = nvrtc.DECODE_TC_ONE_PER_SM  # the 4-warp build for steps of <= 1 pair per SM
DECODE_TC_BUILDS[DECODE_TC_ONE_PER_SM] = (4, 16, 3)
# ... and split over the context (a block per partition of keys, the last block of a row's pairs
# combining them), for the steps that would otherwise run attention_decode.cu: few (row, KV head)
# pairs with contexts past TC_SHORT_CONTEXT. RVLLM_DECODE_TC_SPLIT=0 leaves those to the
# split-context CUDA-core builds. H200, qwen2.5-1.5b batch 1 (bench/NOTES.md #100): the wide CUDA-core
# build added 12.9 us a layer at 1,024 keys and 15.9 at 3,840.
DECODE_TC_SPLIT = nvrtc.DECODE_TC_SPLIT
DECODE_TC_BUILDS[DECODE_TC_SPLIT] = (4, 16, 3)
TC_SPLIT = os.environ.get("RVLLM_DECODE_TC_SPLIT", "1") != "0"
# ... launched where the GPU has thread block clusters (sm_90) as its cluster form, DECODE_TC_CLUSTER
# (the same warps, tiles and stages; cuda_decode_tc.attention_decode_tc): a pair's partitions in one
# cluster, sized on the device from each row's context, combined through distributed shared memory
# (cuda_decode_tc.cluster_blocks). RVLLM_DECODE_TC_CLUSTER=0 keeps the form combined through L2.
# H200, qwen2.5-1.5b batch 1, one call (bench/NOTES.md #102): 1,024-token prompts 906 -> 928 tok/s against
# the L2 form, 3,840 815 -> 873.
DECODE_TC_CLUSTER = nvrtc.DECODE_TC_CLUSTER
TC_CLUSTER = os.environ.get("RVLLM_DECODE_TC_CLUSTER", "1") != "0"
# attention_decode.cu's entry points (split_build chooses among them): name -> threads per block
DECODE_SPLIT_BUILDS = {"paged_attention_split_kernel": nvrtc.DECODE_NUM_THREADS,
                       "paged_attention_split_lean_kernel": nvrtc.DECODE_NUM_THREADS,
                       "paged_attention_split_wide_kernel": nvrtc.DECODE_WIDE_THREADS}


def tc_build(pairs: int, num_sms: int) -> str:
    """attention_decode_tc.cu's entry point for a step of `pairs` (row, KV head) pairs:
    - from 3 pairs per SM, one warp a pair with 32-key tiles, 3 in flight: no combine of warps, and
      a real 256-way run's launches (qwen2.5-1.5b, 255 keys, H200) took 19.2 us against 20.6 for the
      2-warp 16-key build that ran there before (NOTES #86);
    - up to one pair per SM (batch 1 with short contexts), DECODE_TC_ONE_PER_SM, the 4-warp build with
      a small shared-memory carveout;
    - between, 4 warps a pair, 3 tiles in flight each, since the pairs alone leave SMs short of warps
      (H200, session 7, bench/op_times.py: 128 rows x 192 keys 10.7 us against 15.2 for 2 warps)."""
    if pairs >= 3 * num_sms:
        return nvrtc.decode_tc_kernel(1, 32, 3)
    return DECODE_TC_ONE_PER_SM if pairs <= num_sms else nvrtc.decode_tc_kernel(4, 16, 3)


def decode_build(num_tokens: int, num_kv_heads: int, head_dim: int, num_sms: int, group: int,
                 max_context: int | None = None) -> tuple[str, int]:
    """(kernel name, threads) of the decode kernel for a step of num_tokens query rows, `group` query
    heads per KV head, no context longer than max_context tokens (None: unknown).
    - tensor cores (attention_decode_tc.cu, a block of 1 or 4 warps per (row, KV head) pair, see
      tc_build): steps of at least _TC_MIN_PAIRS_PER_SM pairs per SM, or with contexts of at most
      TC_SHORT_CONTEXT tokens, for head sizes that are multiples of 16 up to 128 and GQA groups of
      at most 16 query heads;
    - the other steps of such shapes: the tensor-core build split over the context (DECODE_TC_SPLIT,
      tc_split_partition; on sm_90 cuda_decode_tc launches it as its cluster form, DECODE_TC_CLUSTER,
      unless TC_CLUSTER is off), unless TC_SPLIT is off;
    - otherwise split_build's choice."""
    pairs = num_tokens * num_kv_heads
    short = max_context is not None and max_context <= TC_SHORT_CONTEXT
    tc_ok = head_dim % 16 == 0 and head_dim <= 128 and group <= nvrtc.DECODE_TC_MAX_GROUP
    if tc_ok and (short or pairs >= _TC_MIN_PAIRS_PER_SM * num_sms):
        name = tc_build(pairs, num_sms)
        return name, 32 * DECODE_TC_BUILDS[name][0]
    if tc_ok and TC_SPLIT:
        return DECODE_TC_SPLIT, 32 * DECODE_TC_BUILDS[DECODE_TC_SPLIT][0]
    return split_build(num_tokens, num_kv_heads, head_dim, num_sms)


def short_context_limit(num_tokens: int, num_kv_heads: int, head_dim: int, num_sms: int, group: int,
                        max_context: int) -> int | None:
    """TC_SHORT_CONTEXT when a step of num_tokens rows with no context longer than it gets another
    decode kernel than one with contexts up to max_context (decode_build), else None."""
    limit = TC_SHORT_CONTEXT
    if not 0 < limit < max_context:
        return None
    short = decode_build(num_tokens, num_kv_heads, head_dim, num_sms, group, limit)
    return limit if short != decode_build(num_tokens, num_kv_heads, head_dim, num_sms, group, max_context) else None


def tc_split_partition(num_tokens: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Keys per block of DECODE_TC_SPLIT for a step with contexts up to max_context: the longest
    context spread over about one block per SM (the step's (row, KV head) pairs share them), in
    whole rounds of the block's 4 warps x 16-key tiles, at least one round."""
    warps, tile, _ = DECODE_TC_BUILDS[DECODE_TC_SPLIT]
    round_keys = warps * tile  # one tile for each warp: 64 keys
    blocks_per_pair = max(1, num_sms // max(1, num_tokens * num_kv_heads))
    return max(round_keys, -(-max(max_context, 1) // (blocks_per_pair * round_keys)) * round_keys)


def split_build(num_tokens: int, num_kv_heads: int, head_dim: int, num_sms: int) -> tuple[str, int]:
    """(kernel name, threads) of attention_decode.cu's build for a step:
    - wide (512 threads): steps of fewer (row, KV head) pairs than half the SMs (or at most 8),
      whose time is the latency of a few blocks' load chains; a 128-key partition is one round trip
      for K and one for V, with no cross-block combine up to 128 keys. Up to head size 128 (its
      shared memory grows with warps x head size);
    - lean (128 threads, fewer registers, more blocks per SM): steps with at least one (row, KV head)
      pair per SM. It only saves registers at head sizes >= 128 (at 64 it spills);
    - otherwise the 128-thread build that loads the query before the metadata chain."""
    pairs = num_tokens * num_kv_heads
    if (pairs <= _WIDE_MAX_PAIRS or pairs < _WIDE_MAX_PAIRS_PER_SM * num_sms) and head_dim <= 128:
        name = "paged_attention_split_wide_kernel"
    elif head_dim >= 128 and pairs >= num_sms:
        name = "paged_attention_split_lean_kernel"
    else:
        name = "paged_attention_split_kernel"
    return name, DECODE_SPLIT_BUILDS[name]


def partition_size(num_tokens: int, num_kv_heads: int, max_context: int, num_sms: int,
                   threads: int = nvrtc.DECODE_NUM_THREADS) -> int:
    """Keys per partition of the decode kernel for a step of num_tokens query rows.

    Each block's keys cost a chain of dependent loads (block table, K, then V), so a step with few
    (row, KV head) pairs needs short partitions to spread a context over many blocks: at batch 1 a
    512-key partition left two blocks doing all the work (29 us at a 150-token context, ncu). The
    size is the power of two (32 to the kernel's PARTITION_SIZE) at which a 1024-token context in
    every row would make about two waves of blocks, and at least large enough that max_context needs
    at most PARTITION_SIZE partitions (the combine step's bound). No smaller than one load per warp
    of a build with `threads` threads."""
    limit = nvrtc.DECODE_PARTITION_SIZE
    want = num_tokens * num_kv_heads * 1024 / (2 * max(1, num_sms))
    size = threads // 32 * _KEYS_IN_FLIGHT
    while size < limit and (size < want or -(-max_context // size) > limit):
        size *= 2
    return size


@dataclass
class DecodeWorkspace:
    """Scratch for the decode kernel at fixed addresses (CUDA graphs), for up to `max_tokens` query
    rows of `num_heads` heads with contexts up to `max_context` keys, at the partition size
    partition_size() gives each step size."""

    tmp_out: object  # float32 [rows * head_dim]: rows = max over step sizes of tokens * num_heads * partitions
    tmp_max: object  # float32 [rows]
    tmp_sum: object  # float32 [rows]
    row_stride: object  # int32 [1] on the device: the block table's row stride, written with each step's inputs
    counters: object  # int32 [max_tokens * num_heads], zeros: the kernel's per-(row, KV head) completion counts
    max_tokens: int
    num_heads: int
    head_dim: int
    max_context: int
    num_sms: int

    @classmethod
    def allocate(cls, max_tokens: int, num_heads: int, head_dim: int, max_context: int, row_stride,
                 num_sms: int | None = None):
        """num_sms: the GPU's multiprocessor count (tests pass others to force both grid shapes)."""
        if row_stride.dtype != np.int32 or row_stride.size != 1:
            raise ValueError("DecodeWorkspace: row_stride must be one int32 on the device")
        if -(-max_context // nvrtc.DECODE_PARTITION_SIZE) > nvrtc.DECODE_PARTITION_SIZE:
            raise ValueError(f"DecodeWorkspace: contexts up to {max_context} tokens need more than "
                             f"{nvrtc.DECODE_PARTITION_SIZE} partitions, which the kernel cannot combine")
        if num_sms is None:
            num_sms = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"])
        ws = cls(None, None, None, row_stride, cp.zeros(max_tokens * num_heads, np.int32), max_tokens, num_heads,
                 head_dim, max_context, num_sms)
        ws._reserve()
        return ws

    def reserved_rows(self) -> int:
        """Partition rows of scratch for the largest step size, whatever the KV-head count: the
        128-thread builds' partition size at one KV head is the smallest any layout() uses (it grows
        with the KV-head count, and the wide build's is at least as large), so it gives the most
        partitions."""
        def most_parts(t: int) -> int:
            size = partition_size(t, 1, self.max_context, self.num_sms, nvrtc.DECODE_NUM_THREADS)
            return max(1, -(-self.max_context // size))
        return max(t * self.num_heads * most_parts(t) for t in range(1, self.max_tokens + 1))

    def _reserve(self) -> None:
        rows = self.reserved_rows()
        self.tmp_out = cp.empty(rows * self.head_dim, np.float32)
        self.tmp_max = cp.empty(rows, np.float32)
        self.tmp_sum = cp.empty(rows, np.float32)

    def layout(self, num_tokens: int, num_kv_heads: int, threads: int | None = None) -> tuple[int, int, int]:
        """(partition size, partitions a max_context row has, blocks along the partition axis: enough
        to fill the GPU, at most one per partition) for the split build with `threads` threads
        (default: split_build's choice)."""
        if threads is None:
            threads = split_build(num_tokens, num_kv_heads, self.head_dim, self.num_sms)[1]
        size = partition_size(num_tokens, num_kv_heads, self.max_context, self.num_sms, threads)
        parts = max(1, -(-self.max_context // size))
        want = math.ceil(_BLOCKS_PER_SM * self.num_sms / max(1, num_kv_heads * num_tokens))
        return size, parts, max(1, min(parts, want))


def check_attention(b, nh: int, hd: int, k_cache, v_cache, meta) -> int:
    """What every attention kernel reads besides the queries (ValueError); returns num_reqs."""
    b._check("k_cache", k_cache, ndim=4)
    nkv = k_cache.shape[2]
    check_cache(b, k_cache, v_cache, nkv, hd)
    if nh % nkv:
        raise ValueError(f"paged_attention: {nh} query heads is not a multiple of {nkv} KV heads")
    b._check("query_start_loc", meta.query_start_loc, np.int32, ndim=1)
    b._check("seq_lens", meta.seq_lens, np.int32, ndim=1)
    b._check("block_tables", meta.block_tables, np.int32, ndim=2)
    num_reqs = meta.seq_lens.shape[0]
    if meta.query_start_loc.shape[0] != num_reqs + 1 or meta.block_tables.shape[0] < num_reqs:
        raise ValueError(f"paged_attention: query_start_loc {meta.query_start_loc.shape}, seq_lens "
                         f"{meta.seq_lens.shape}, block_tables {meta.block_tables.shape} disagree")
    if hd % 8:
        raise ValueError(f"paged_attention: head_dim must be a multiple of 8, got {hd}")
    return num_reqs


def paged_attention(b, q, k_cache, v_cache, meta, scale: float):
    """Causal attention of q [T, nh, hd] over each request's cached K/V -> [T, nh, hd] (b: the
    CudaBackend). Decode-only steps (max_query_len == 1) use a decode kernel (decode_build: tensor
    cores or the split-context kernel); others the tensor-core prefill kernel. Rows no request owns
    come back as zeros."""
    b._check("paged_attention q", q, ndim=3)
    num_tokens, nh, hd = q.shape
    num_reqs = check_attention(b, nh, hd, k_cache, v_cache, meta)
    block_size = k_cache.shape[1]
    workspace = getattr(meta, "decode_workspace", None)
    if num_tokens == 0 or num_reqs == 0:
        if workspace is not None:
            raise ValueError("paged_attention: a fixed (graph) decode step needs rows and requests")
        return cp.zeros_like(q)
    prefill_ok = hd % 16 == 0 and hd <= 128
    if meta.max_query_len <= 1 or b.attention == "split" or not prefill_ok:
        return _attention_split(b, q, k_cache, v_cache, meta, scale, num_reqs, block_size,
                                workspace if meta.max_query_len <= 1 else None)
    return _attention_prefill(b, q, k_cache, v_cache, meta, scale, num_reqs, block_size)


def _attention_split(b, q, k_cache, v_cache, meta, scale, num_reqs, block_size, workspace):
    num_tokens, nh, hd = q.shape
    nkv = k_cache.shape[2]
    group = nh // nkv
    # bench/op_times.py swaps decode_build to time each kernel. A graph step's max_seq_len is the
    # longest context its graph holds (runner/graphs.py), an eager step's its own longest.
    name, threads = decode_build(num_tokens, nkv, hd, b.num_sms, group, int(meta.max_seq_len))
    if name in DECODE_TC_BUILDS:
        return cuda_decode_tc.attention_decode_tc(b, name, q, k_cache, v_cache, meta, scale, num_reqs, block_size,
                                                  workspace)
    if workspace is None:  # eager: scratch for this step's longest context, one block per partition
        max_seq = int(meta.max_seq_len)
        if -(-max_seq // nvrtc.DECODE_PARTITION_SIZE) > nvrtc.DECODE_PARTITION_SIZE:
            raise ValueError(f"paged_attention (split): a {max_seq}-token context needs more than "
                             f"{nvrtc.DECODE_PARTITION_SIZE} partitions, which the kernel cannot combine")
        size = partition_size(num_tokens, nkv, max_seq, b.num_sms, threads)
        parts = max(1, -(-max_seq // size))
        grid_parts = parts
        tmp_out = cp.empty((num_tokens, nh, parts, hd), dtype=np.float32)
        tmp_max = cp.empty((num_tokens, nh, parts), dtype=np.float32)
        tmp_sum = cp.empty((num_tokens, nh, parts), dtype=np.float32)
        stride_arg, stride_dev = np.int32(meta.block_tables.shape[1]), np.uint64(0)  # a null pointer
        counters = _eager_counters(b, num_tokens * nkv)
    else:  # fixed: shapes only (CUDA graphs)
        ws = workspace
        if num_tokens > ws.max_tokens or nh != ws.num_heads or hd != ws.head_dim:
            raise ValueError(f"paged_attention: workspace is for {ws.max_tokens} rows x {ws.num_heads} heads x "
                             f"{ws.head_dim}, got {num_tokens} x {nh} x {hd}")
        size, parts, grid_parts = ws.layout(num_tokens, nkv, threads)
        rows = num_tokens * nh * parts
        if rows > ws.tmp_max.size:
            raise ValueError(f"paged_attention: the workspace holds {ws.tmp_max.size} partition rows, this step needs {rows}")
        tmp_out, tmp_max, tmp_sum = ws.tmp_out[: rows * hd], ws.tmp_max[:rows], ws.tmp_sum[:rows]
        stride_arg, stride_dev = np.int32(0), ws.row_stride
        counters = ws.counters
    if num_tokens > MAX_GRID_YZ or parts > MAX_GRID_YZ:
        raise ValueError(f"paged_attention (split): {num_tokens} query rows or {parts} partitions exceed {MAX_GRID_YZ}")
    out = cp.empty_like(q)
    split = b._kernel("attention_decode.cu", name, hd)
    smem = nvrtc.decode_smem_bytes(hd, group, threads)
    b._ensure_smem(split, smem)
    split((nkv, num_tokens, grid_parts), (threads,),
          (out, counters, tmp_out, tmp_max, tmp_sum, q, k_cache, v_cache, meta.block_tables, stride_arg, stride_dev,
           meta.query_start_loc, meta.seq_lens,
           np.int32(num_reqs), np.int32(nh), np.int32(nkv), np.int32(block_size), np.int32(parts),
           np.int32(size), np.float32(scale)),
          shared_mem=smem)
    return out


def _eager_counters(b, n: int):
    """The decode kernel's completion counters for eager steps: zeros, kept by the backend and grown
    on demand (every launch leaves them zero again; launches on one stream never overlap)."""
    counters = getattr(b, "_decode_counters", None)
    if counters is None or counters.size < n:
        counters = cp.zeros(max(n, 1024), np.int32)
        b._decode_counters = counters
    return counters


def _attention_prefill(b, q, k_cache, v_cache, meta, scale, num_reqs, block_size):
    num_tokens, nh, hd = q.shape
    nkv = k_cache.shape[2]
    group = nh // nkv
    if num_reqs > MAX_GRID_YZ:
        raise ValueError(f"paged_attention (prefill): {num_reqs} requests exceed {MAX_GRID_YZ}")
    out = cp.empty_like(q)
    covered = int(sum(meta.query_lens_host))  # rows past the last request's are padding
    if covered < num_tokens:
        out[covered:] = 0
    m_tiles = -(-int(meta.max_query_len) * group // 64)  # BLOCK_M in attention_prefill.cu
    if m_tiles:
        kernel = b._kernel("attention_prefill.cu", "paged_attention_prefill_kernel", hd)
        smem = nvrtc.prefill_smem_bytes(hd)
        b._ensure_smem(kernel, smem)
        kernel((m_tiles, nkv, num_reqs), (128,),
               (out, q, k_cache, v_cache, meta.block_tables, np.int32(meta.block_tables.shape[1]),
                meta.query_start_loc, meta.seq_lens, np.int32(nh), np.int32(nkv), np.int32(block_size),
                np.float32(scale)), shared_mem=smem)
    return out
