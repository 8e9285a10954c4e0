"""bfloat16 on the host: NumPy has no bfloat16 dtype, so it travels as its raw uint16 bits.

Used by the safetensors reader (bf16 checkpoints), the CPU backend (to compute in float32) and the
CUDA backend (which keeps bf16 as uint16 storage on the device).
"""
from __future__ import annotations

import numpy as np


def float32_to_bf16_bits(x) -> np.ndarray:
    """float array -> bfloat16 bits (uint16), rounded to nearest even as torch does, NaN kept NaN."""
    x = np.asarray(x)
    if x.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: already the bits
        return np.ascontiguousarray(x).view(np.uint16)
    f = np.ascontiguousarray(x, dtype=np.float32)
    b = f.view(np.uint32).astype(np.uint64)
    bits = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    bits[np.isnan(f)] = 0x7FC0
    return bits


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
