"""Logprobs: log-softmax, the chosen token's logprob and rank, the top-k, and vLLM's dict shape."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rvllm.outputs import Logprob


@dataclass(slots=True)
class LogprobsRow:
    """One sampled position: the chosen token's logprob and rank, plus the top-k (sorted, best first)."""
    token_id: int
    logprob: float
    rank: int  # 1 = most likely; tied tokens all count as ahead (vLLM: number of logprobs >= chosen)
    top_ids: list[int]
    top_logprobs: list[float]


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32. A row that is all -inf stays all -inf (no NaN)."""
    x = np.asarray(x, dtype=np.float32)
    mx = x.max(axis=1, keepdims=True)
    mx[~np.isfinite(mx)] = 0.0
    shifted = x - mx
    # float32 pairwise sum per row (no float64 accumulator: its buffered casts can straddle rows,
    # making a row's result depend on its neighbors); the relative error is ~1e-7.
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    shifted -= lse
    return shifted


def gather_logprobs(logprobs: np.ndarray, token_ids: np.ndarray, num_top: Sequence[int]) -> list[LogprobsRow]:
    """logprobs: [n, V] (log-softmaxed); token_ids: [n] chosen ids; num_top[i]: top-k wanted for row i."""
    n, vocab = logprobs.shape
    token_ids = np.asarray(token_ids, dtype=np.int64)
    chosen = logprobs[np.arange(n), token_ids]  # [n]
    ranks = np.count_nonzero(logprobs >= chosen[:, None], axis=1)  # [n]
    k = min(max(num_top, default=0), vocab)
    if k > 0:
        if k < vocab:
            top_idx = np.argpartition(logprobs, vocab - k, axis=1)[:, vocab - k:]  # [n, k], unordered
        else:
            top_idx = np.broadcast_to(np.arange(vocab), (n, vocab))
        top_val = np.take_along_axis(logprobs, top_idx, axis=1)
        # Best first; equal logprobs in token-id order so the output is deterministic.
        order = np.lexsort((top_idx, -top_val), axis=1)
        top_idx = np.take_along_axis(top_idx, order, axis=1).tolist()
        top_val = np.take_along_axis(top_val, order, axis=1).tolist()
    rows = []
    for i in range(n):
        m = min(num_top[i], vocab)
        rows.append(LogprobsRow(int(token_ids[i]), float(chosen[i]), int(ranks[i]),
                                top_idx[i][:m] if m else [], top_val[i][:m] if m else []))
    return rows


def to_logprob_dicts(rows: Sequence[LogprobsRow | None]) -> list[dict[int, Logprob] | None]:
    """vLLM's shape: {token_id: Logprob}, the chosen token first, then the top-k with ranks 1..k.

    When the chosen token is also in the top-k its entry keeps the top-k rank (as vLLM builds it).
    """
    out: list[dict[int, Logprob] | None] = []
    for row in rows:
        if row is None:
            out.append(None)
            continue
        d = {row.token_id: Logprob(row.logprob, row.rank)}
        for r, (tid, lp) in enumerate(zip(row.top_ids, row.top_logprobs), start=1):
            d[tid] = Logprob(lp, r)
        out.append(d)
    return out


def compute_prompt_logprobs(logits: np.ndarray, next_token_ids, k: int) -> list[dict[int, Logprob]]:
    """prompt_logprobs: logits [n, V] at prompt positions 0..n-1, next_token_ids [n] the prompt tokens
    1..n; returns per position {actual next token + top-k}. Raw logits (no penalties or temperature).
    The caller prepends None for the first prompt token, which has no logprob (vLLM's shape)."""
    if len(next_token_ids) == 0:
        return []
    rows = gather_logprobs(log_softmax(logits), np.asarray(next_token_ids), [k] * len(next_token_ids))
    return to_logprob_dicts(rows)  # type: ignore[return-value]
