"""Composite ops both backends expose, written once from the basic ops.

`add_norm_linear` is the start of each half of a Llama layer: residual add, RMSNorm, the
projection and (for the MLP) SiLU-and-mul. CpuBackend runs it as written here; CudaBackend runs
it as one kernel for decode-sized steps (kernels_cu/gemv.cu) and as written here otherwise.
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
