"""Composite ops both backends expose, written once from the basic ops.

`add_norm_linear` is the start of each half of a Llama layer: residual add, RMSNorm, the
projection and (for the MLP) SiLU-and-mul. CpuBackend runs it as written here; CudaBackend runs
it as one kernel for decode-sized steps (kernels_cu/gemv.cu) and as written here otherwise.
`rotary_cache_attention` is the attention itself: rotary, the KV-cache write, paged attention.
CudaBackend runs it as the decode kernel alone for decode steps (kernels_cu/attention_decode.cu).
"""
from __future__ import annotations

ACTIVATIONS = (None, "silu_and_mul")


def add_norm_linear(ops, x, residual, norm_weight, eps: float, weight, bias=None, act=None):
    """(act(rms_norm(x + residual) @ weight.T + bias), x + residual).

    residual None: x is the residual stream itself (the first layer), returned unchanged.
    act "silu_and_mul": weight is [gate; up] ([2I, K]) and the result silu(gate) * up ([T, I])."""
    if act not in ACTIVATIONS:
        raise ValueError(f"add_norm_linear: act must be one of {ACTIVATIONS}, got {act!r}")
    if residual is None:
        residual, normed = x, ops.rms_norm(x, norm_weight, eps)
    else:
        normed, residual = ops.fused_add_rms_norm(x, residual, norm_weight, eps)
    y = ops.linear(normed, weight, bias)
    if act == "silu_and_mul":
        y = ops.silu_and_mul(y)
    return y, residual


def rotary_cache_attention(ops, q, k, v, positions, cos_sin, k_cache, v_cache, meta, scale: float, neox: bool):
    """paged_attention(rotary(q), ...) after rotary(k) and v are written to the cache at
    meta.slot_mapping: q [T, nh, hd], k and v [T, nkv, hd], unrotated -> [T, nh, hd]."""
    q = ops.rotary_and_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, neox)
    return ops.paged_attention(q, k_cache, v_cache, meta, scale)
