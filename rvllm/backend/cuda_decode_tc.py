"""The launches of kernels_cu/attention_decode_tc.cu, decode attention on tensor cores: its builds a
block per (row, KV head) pair (cuda_attention.tc_build), the build split over the context with a
combine (cuda_attention.DECODE_TC_SPLIT; on sm_90 its cluster form, DECODE_TC_CLUSTER), and the rope
builds (decode_rope). cuda_attention.py chooses the kernel (decode_build) and calls
attention_decode_tc; the choosers and settings are read from there at each call, so that tests and
bench/op_times.py can swap them.
"""
from __future__ import annotations

import numpy as np

from rvllm.backend import cuda_attention as ca, cuda_launch, nvrtc

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

# The one-pair-per-SM build's preferred carveout (percent): the smallest configuration that holds one
# block (bench/NOTES.md #50).
_ONE_PER_SM_CARVEOUT = 0
# ... and the split build's, for the same reason: left to the driver, qwen2.5-1.5b's batch 1 at 1,024
# keys ran 773 tok/s against 838 (H200, bench/NOTES.md #100), the GEMVs around it slower.
_SPLIT_CARVEOUT = 0
# (kernel, blocks a cluster, dynamic shared memory) -> clusters resident at once (cuOccupancyMaxActiveClusters)
_cluster_capacity: dict[tuple[int, int, int], int] = {}


def cluster_blocks(pairs: int, num_sms: int, max_blocks: int = nvrtc.DECODE_TC_CLUSTER_MAX) -> int:
    """Blocks a cluster of DECODE_TC_CLUSTER for a step of `pairs` (row, KV head) pairs: the largest
    power of two up to max_blocks whose clusters of every pair stay within the SMs (so a long context
    spreads over about one block an SM, as tc_split_partition does for the form combined in L2).
    1: too many pairs for a cluster of 2."""
    blocks = 1
    while blocks * 2 <= max_blocks and pairs * blocks * 2 <= num_sms:
        blocks *= 2
    return blocks


def _cluster_form(b, kernel, pairs: int, smem: int) -> int:
    """Blocks a cluster for DECODE_TC_SPLIT's step of `pairs` pairs in its cluster form, or 1 (the form
    combined in L2): cluster_blocks, halved until every pair's cluster is resident at once."""
    if not ca.TC_CLUSTER or not cuda_launch.clusters_available():
        return 1
    blocks = cluster_blocks(pairs, b.num_sms)
    if kernel.preferred_shared_memory_carveout != _SPLIT_CARVEOUT:  # before the occupancy query: it depends on it
        kernel.preferred_shared_memory_carveout = _SPLIT_CARVEOUT
    while blocks > 1:
        key = (id(kernel), blocks, smem)
        if key not in _cluster_capacity:
            _cluster_capacity[key] = kernel.max_active_clusters((1, 1, blocks), (128,), smem, blocks)
        if _cluster_capacity[key] >= pairs:
            return blocks
        blocks //= 2
    return 1


def attention_decode_tc(b, name, q, k_cache, v_cache, meta, scale, num_reqs, block_size, workspace, rope=None):
    """The tensor-core decode kernel on a grid of the step's shape, so eager and graph steps differ
    only in where the block table's row stride comes from (and, for DECODE_TC_SPLIT's form combined
    in L2, its scratch: _tc_split_launch; the other builds and the cluster form need none). rope: (qkv row
    stride, its other arguments) for the rope build, whose q is the qkv product [T, qkv stride]
    (decode_rope); None: q is [T, nh, hd]."""
    num_tokens, nh, hd = q.shape if rope is None else (q.shape[0], *rope[0])
    nkv = k_cache.shape[2]
    if num_tokens > ca.MAX_GRID_YZ:
        raise ValueError(f"paged_attention (tensor-core decode): {num_tokens} query rows exceed {ca.MAX_GRID_YZ}")
    if workspace is None:
        stride_arg, stride_dev = np.int32(meta.block_tables.shape[1]), np.uint64(0)  # a null pointer
    else:
        stride_arg, stride_dev = np.int32(0), workspace.row_stride
    out = cp.empty((num_tokens, nh, hd), dtype=q.dtype)
    warps, tile, stages = ca.DECODE_TC_BUILDS[name]
    smem = nvrtc.decode_tc_smem_bytes(hd, warps, tile, stages)
    grid, split_args, cluster = (nkv, num_tokens), (), 1
    if name == ca.DECODE_TC_SPLIT:
        kernel = b._kernel("attention_decode_tc.cu", ca.DECODE_TC_CLUSTER, hd)
        b._ensure_smem(kernel, smem)
        cluster = _cluster_form(b, kernel, num_tokens * nkv, smem)
        if cluster > 1:  # no scratch: the partitions are sized on the device
            name, grid = ca.DECODE_TC_CLUSTER, (nkv, num_tokens, cluster)
        else:
            grid, split_args = _tc_split_launch(b, num_tokens, nh, nkv, hd, meta, workspace)
    kernel = b._kernel("attention_decode_tc.cu", name if rope is None else nvrtc.decode_tc_rope_kernel(name), hd)
    b._ensure_smem(kernel, smem)
    if name == ca.DECODE_TC_ONE_PER_SM and kernel.preferred_shared_memory_carveout != _ONE_PER_SM_CARVEOUT:
        kernel.preferred_shared_memory_carveout = _ONE_PER_SM_CARVEOUT
    split = name in (ca.DECODE_TC_SPLIT, ca.DECODE_TC_CLUSTER)
    if split and kernel.preferred_shared_memory_carveout != _SPLIT_CARVEOUT:
        kernel.preferred_shared_memory_carveout = _SPLIT_CARVEOUT
    args = (out, q, k_cache, v_cache, meta.block_tables, stride_arg, stride_dev, meta.query_start_loc, meta.seq_lens,
            np.int32(num_reqs), np.int32(nh), np.int32(nkv), np.int32(block_size), np.float32(scale))
    if rope is not None:
        args += (k_cache, v_cache) + rope[1]
    kernel(grid, (32 * warps,), args + split_args, shared_mem=smem, cluster=cluster)
    return out


def _tc_split_launch(b, num_tokens: int, nh: int, nkv: int, hd: int, meta, workspace):
    """(grid, the extra arguments) of DECODE_TC_SPLIT: a block per partition of the longest context
    the step may hold (an eager step's own, the workspace's in a fixed step), the scratch and the
    counters from the workspace in a fixed (graph) step, allocated here in an eager one."""
    # a fixed step: every context its graph may replay (as the CUDA-core builds' layout)
    max_context = workspace.max_context if workspace is not None else int(meta.max_seq_len)
    size = ca.tc_split_partition(num_tokens, nkv, max_context, b.num_sms)
    parts = max(1, -(-max_context // size))
    if num_tokens > ca.MAX_GRID_YZ or parts > ca.MAX_GRID_YZ:
        raise ValueError(f"paged_attention (tensor-core split): {num_tokens} rows or {parts} partitions exceed {ca.MAX_GRID_YZ}")
    rows = num_tokens * nh * parts
    if workspace is None:
        tmp_out = cp.empty(rows * hd, dtype=np.float32)
        tmp_max, tmp_sum = cp.empty(rows, dtype=np.float32), cp.empty(rows, dtype=np.float32)
        counters = ca._eager_counters(b, num_tokens * nkv)
    else:
        if rows > workspace.tmp_max.size or num_tokens * nkv > workspace.counters.size:
            raise ValueError(f"paged_attention: the workspace holds {workspace.tmp_max.size} partition rows, "
                             f"this step needs {rows}")
        tmp_out, tmp_max, tmp_sum = workspace.tmp_out[: rows * hd], workspace.tmp_max[:rows], workspace.tmp_sum[:rows]
        counters = workspace.counters
    return (nkv, num_tokens, parts), (counters, tmp_out, tmp_max, tmp_sum, np.int32(parts), np.int32(size))


def decode_rope(b, qkv, heads, positions, cos_sin, k_cache, v_cache, meta, scale: float, neox: bool):
    """rotary_and_cache_write of the qkv product's q, k and v, then paged_attention of the rotated
    q, as one kernel: the tensor-core decode kernel's rope build (attention_decode_tc.cu), where
    DECODE_ROPE is on, for decode steps that run that kernel (decode_build) at more than one pair
    per SM, with rotary inputs it takes; otherwise None (nothing run). qkv [T, (nh + 2 nkv) hd],
    rows 16-byte aligned; heads (nh, nkv, hd). The caller has checked the rotary inputs
    (check_rotary_inputs). Returns [T, nh, hd]."""
    nh, nkv, hd = heads
    if not ca.DECODE_ROPE or meta.max_query_len > 1 or (neox and hd % 32):
        return None  # neox pairs (j, j + hd/2) must fall in one lane's fragments (k-steps hd/32 apart)
    b._check("decode_rope qkv", qkv, ndim=2, contiguous=False)
    num_tokens = qkv.shape[0]
    isz = qkv.itemsize
    if qkv.shape[1] != (nh + 2 * nkv) * hd or qkv.strides[1] != isz or qkv.strides[0] % 16 or qkv.data.ptr % 16:
        return None
    num_reqs = ca.check_attention(b, nh, hd, k_cache, v_cache, meta)
    if num_tokens == 0 or num_reqs == 0 or cos_sin.data.ptr % 16:
        return None
    name, _ = ca.decode_build(num_tokens, nkv, hd, b.num_sms, nh // nkv, int(meta.max_seq_len))
    if name not in ca.DECODE_TC_BUILDS or name == ca.DECODE_TC_SPLIT or \
            (name == ca.DECODE_TC_ONE_PER_SM and not ca.DECODE_ROPE_ONE_PER_SM):  # the split build has no rope build
        return None
    workspace = getattr(meta, "decode_workspace", None)
    rope = ((nh, hd), (np.int64(qkv.strides[0] // isz), positions, meta.slot_mapping, cos_sin,
                       np.int32(cos_sin.shape[0]), np.int32(1 if neox else 0)))
    return attention_decode_tc(b, name, qkv, k_cache, v_cache, meta, scale, num_reqs, k_cache.shape[1], workspace,
                                rope)
