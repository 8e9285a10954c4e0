"""Composite ops both backends expose, written once from the basic ops.

`add_norm_linear` is the start of each half of a Llama layer: residual add, RMSNorm, the
projection and (for the MLP) SiLU-and-mul. `add_norm_qkv_rotary` is the attention half's start up
to the KV cache: the same with the qkv projection, then rotary and the cache write.
`qkv_rotary_attention` is that and attention: the attention half up to the output projection.
`add_norm_logits` is the model's end: the last residual add, the final norm and the logits.
CpuBackend runs them as written here. CudaBackend runs the first two and the last as one kernel
for decode-sized steps (kernels_cu/gemv.cu, gemv_rope.cu), and in the third can put rotary and the
cache write into the tensor-core decode attention kernel (attention_decode_tc.cu's rope builds, an
experiment setting: cuda_attention.DECODE_ROPE); as written here otherwise.
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


def add_norm_qkv_rotary(ops, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                        k_cache, v_cache, slot_mapping, neox: bool):
    """(rotated q [T, nh, hd], x + residual): add_norm_linear with the qkv weight ([(nh + 2 nkv) hd, H],
    q, k and v heads in that order), then rotary_and_cache_write, which writes the rotated k and v
    into the paged cache at slot_mapping. heads: (nh, nkv, hd)."""
    qkv, residual = ops.add_norm_linear(x, residual, norm_weight, eps, weight, bias)  # [T, (nh + 2 nkv) hd]
    q, k, v = split_qkv(qkv, heads)
    q = ops.rotary_and_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, neox)
    return q, residual


def qkv_rotary_attention(ops, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                         k_cache, v_cache, meta, neox: bool, scale: float):
    """(attention output [T, nh, hd], x + residual): add_norm_qkv_rotary (the slots are
    meta.slot_mapping), then paged_attention over the cache it wrote."""
    q, residual = ops.add_norm_qkv_rotary(x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                          k_cache, v_cache, meta.slot_mapping, neox)
    return ops.paged_attention(q, k_cache, v_cache, meta, scale), residual


def add_norm_logits(ops, x, residual, norm_weight, eps: float, lm_head, out=None):
    """rms_norm(x + residual) @ lm_head.T as float32 logits [T, V] (into `out` when given).
    residual None: x is the residual stream itself."""
    if residual is None:
        normed = ops.rms_norm(x, norm_weight, eps)
    else:
        normed, _ = ops.fused_add_rms_norm(x, residual, norm_weight, eps)
    return ops.logits(normed, lm_head, out=out)


def split_qkv(qkv, heads):
    """[T, (nh + 2 nkv) hd] -> q [T, nh, hd], k and v [T, nkv, hd]: views, each token's heads contiguous."""
    nh, nkv, hd = heads
    t = qkv.shape[0]
    return (qkv[:, : nh * hd].reshape(t, nh, hd), qkv[:, nh * hd: (nh + nkv) * hd].reshape(t, nkv, hd),
            qkv[:, (nh + nkv) * hd:].reshape(t, nkv, hd))
