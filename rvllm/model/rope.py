"""Rotary embedding tables, computed once on the host at load time (float64, stored float32)."""
from __future__ import annotations

import math

import numpy as np

from rvllm.model.config import ModelSpec


def inv_frequencies(spec: ModelSpec) -> np.ndarray:
    """[head_dim / 2] inverse frequencies, with HF's llama3 / linear rope scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Same arithmetic as transformers' _compute_llama3_parameters.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq


def cos_sin_table(spec: ModelSpec, max_positions: int) -> np.ndarray:
    """[max_positions, head_dim] float32: cos in the first half of each row, sin in the second."""
    inv_freq = inv_frequencies(spec)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # [P, hd/2]
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
