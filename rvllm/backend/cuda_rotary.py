"""Rotary embedding and the KV-cache write on the GPU: the wrapper of kernels_cu/rotary.cu, and the
checks of the cache and the rotary inputs that the kernels writing the cache share (rotary.cu,
gemv_rope.cu, attention_decode_tc.cu's rope builds). CudaBackend.rotary_and_cache_write calls
rotary_and_cache_write; backend/cpu.py is the reference semantics.
"""
from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None


def check_cache(b, k_cache, v_cache, nkv: int, hd: int) -> None:
    b._check("k_cache", k_cache, ndim=4)
    b._check("v_cache", v_cache, ndim=4)
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != (nkv, hd):
        raise ValueError(f"KV cache: k {k_cache.shape}, v {v_cache.shape}; expected [num_blocks, block_size, {nkv}, {hd}]")
    if k_cache.data.ptr % 16 or v_cache.data.ptr % 16:
        raise ValueError("KV cache: base address must be 16-byte aligned")
    block_size = k_cache.shape[1]
    if block_size <= 0 or block_size & (block_size - 1):  # attention_decode_tc.cu finds a key's block by shifts
        raise ValueError(f"KV cache: block_size must be a power of two, got {block_size}")


def _heads_view(b, name: str, x, num_tokens: int) -> int:
    """Checks a [T, heads, head_dim] view whose heads are contiguous; returns the token stride."""
    b._check(name, x, ndim=3, contiguous=False)
    isz = x.itemsize
    if x.shape[0] != num_tokens:
        raise ValueError(f"{name}: {x.shape[0]} tokens, expected {num_tokens}")
    if x.strides[2] != isz or (x.shape[1] > 1 and x.strides[1] != x.shape[2] * isz) or x.strides[0] < 0 \
            or x.strides[0] % isz:
        raise ValueError(f"{name}: each token's [heads, head_dim] must be contiguous (strides {x.strides})")
    return x.strides[0] // isz


def check_rotary_inputs(b, positions, cos_sin, k_cache, v_cache, slot_mapping, num_tokens: int, nkv: int,
                        hd: int) -> None:
    """What rotary_cache_kernel and gemv_rope.cu read besides q, k and v (ValueError)."""
    if hd % 2:
        raise ValueError(f"rotary: head_dim must be even, got {hd}")
    b._check("rotary positions", positions, np.int32, ndim=1)
    b._check("rotary slot_mapping", slot_mapping, np.int32, ndim=1)
    if positions.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"rotary: positions {positions.shape} / slot_mapping {slot_mapping.shape} vs {num_tokens} tokens")
    b._check("rotary cos_sin", cos_sin, np.float32, ndim=2)
    if cos_sin.shape[1] != hd:
        raise ValueError(f"rotary: cos_sin rows have {cos_sin.shape[1]} values, head_dim is {hd}")
    check_cache(b, k_cache, v_cache, nkv, hd)


def rotary_and_cache_write(b, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, neox: bool):
    """CudaBackend.rotary_and_cache_write (b: the backend): rotary_cache_kernel, which writes the
    new tokens' K and V into the paged cache that the attention kernels here read.
    q [T, nh, hd], k and v [T, nkv, hd] (strided views of the qkv output are fine).
    Returns the rotated q, contiguous [T, nh, hd]."""
    num_tokens, nh, hd = q.shape
    q_stride = _heads_view(b, "rotary q", q, num_tokens)
    k_stride = _heads_view(b, "rotary k", k, num_tokens)
    v_stride = _heads_view(b, "rotary v", v, num_tokens)
    nkv = k.shape[1]
    if k.shape[2] != hd or v.shape != k.shape:
        raise ValueError(f"rotary: shapes q {q.shape}, k {k.shape}, v {v.shape}")
    check_rotary_inputs(b, positions, cos_sin, k_cache, v_cache, slot_mapping, num_tokens, nkv, hd)
    q_out = cp.empty((num_tokens, nh, hd), dtype=b.compute_dtype)
    if num_tokens:
        # A thread per item (one block per token): four rotated pairs of a q or k head, or 16 bytes
        # of v (rotary.cu's vector path); a thread per rotated pair of q where that path cannot run.
        # With 128 threads, 7 dependent rounds made it 7.4 us at batch 1 on an H100 (ncu).
        half = hd // 2
        items = (nh + nkv) * (half // 4) + nkv * hd // 8 if half % 4 == 0 else nh * half
        threads = min(1024, max(64, -(-items // 32) * 32))
        b._kernel("rotary.cu", "rotary_cache_kernel")(
            (num_tokens,), (threads,),
            (q_out, k_cache, v_cache, q, np.int64(q_stride), k, np.int64(k_stride), v, np.int64(v_stride),
             positions, slot_mapping, cos_sin, np.int32(cos_sin.shape[0]),
             np.int32(nh), np.int32(nkv), np.int32(hd), np.int32(1 if neox else 0)))
    return q_out
