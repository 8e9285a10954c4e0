"""NumPy ops: the reference semantics every CUDA kernel is tested against.

The CUDA backend (backend/cuda.py) implements the same methods with the same shapes. All math here
is float32; weights arrive as float32 whatever dtype the checkpoint had.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rvllm.backend.fused import add_norm_linear as _add_norm_linear
from rvllm.backend.fused import add_norm_logits as _add_norm_logits
from rvllm.backend.fused import add_norm_qkv_rotary as _add_norm_qkv_rotary
from rvllm.backend.fused import qkv_rotary_attention as _qkv_rotary_attention
from rvllm.bf16 import bf16_bits_to_float32


@dataclass
class AttentionMetadata:
    """One ragged step. Tokens of all requests are concatenated; request i owns query rows
    query_start_loc[i]:query_start_loc[i+1], whose positions are the last rows of its seq_lens[i]."""

    query_start_loc: object  # [num_reqs + 1] int32
    seq_lens: object  # [num_reqs] int32: tokens in context after this step
    block_tables: object  # [num_reqs, max_blocks] int32, padded with 0
    slot_mapping: object  # [num_tokens] int32: cache slot of each new token; -1 = padding, not written
    max_query_len: int
    max_seq_len: int
    # Host copies of the per-request lengths (Python lists) so the CPU path can loop without syncs.
    query_lens_host: list[int]
    seq_lens_host: list[int]


class CpuBackend:
    name = "cpu"
    xp = np
    compute_dtype = np.float32

    # ---- memory -------------------------------------------------------------------------------
    def from_host(self, arr: np.ndarray, dtype=None) -> np.ndarray:
        return np.ascontiguousarray(arr, dtype=dtype)

    def to_host(self, arr) -> np.ndarray:
        return np.asarray(arr)

    def weight(self, arr: np.ndarray, dtype_name: str = "float32") -> np.ndarray:
        """A checkpoint tensor (bfloat16 arrives as uint16 bits) in the dtype this backend computes in."""
        if dtype_name == "bfloat16":
            return bf16_bits_to_float32(arr)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def weight_concat(self, parts) -> np.ndarray:
        """[(tensor, dtype_name)] concatenated along the first dimension, as float32."""
        return np.concatenate([self.weight(a, d) for a, d in parts], axis=0)

    def weights_loaded(self) -> None:
        pass

    def prepare_kernels(self, head_dim: int) -> None:
        """CudaBackend compiles its kernels here; NumPy has none."""

    def dummy_weight(self, shape, std: float, seed: int, mean: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= std
        out += mean
        return out

    def zeros(self, shape, dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        pass

    # ---- ops ----------------------------------------------------------------------------------
    def unpack_step_inputs(self, dst, src, ids_at: int, num_ids: int, prev_sampled, tables, table, row_slots,
                           col0, diff_off, new_ids, seq_lens, block_size: int, embed=None) -> None:
        """A step's inputs from the buffer they were copied into (runner/step_inputs.py) to the one
        the forward reads: dst[:src.size] = src, the token ids src[ids_at: ids_at + num_ids] packed as
        -1 - k (async scheduling's placeholders) replaced by prev_sampled[k] (None: there are none);
        then update_block_tables(tables, table, row_slots, ...), whose index arrays may be views of
        src. dst may be src itself. embed: (table [V, H], out [>= num_ids, H]) to also gather the
        ids' embedding rows into out (what embedding() returns)."""
        n = src.shape[0]
        if n > dst.shape[0] or ids_at < 0 or ids_at + num_ids > n:
            raise ValueError(f"unpack_step_inputs: {n} values into {dst.shape[0]}, ids at {ids_at}..{ids_at + num_ids}")
        if dst is not src:
            dst[:n] = src
        if prev_sampled is not None:
            ids = dst[ids_at: ids_at + num_ids]
            neg = ids < 0
            ids[neg] = np.asarray(prev_sampled)[-1 - ids[neg]]
        self.update_block_tables(tables, table, row_slots, col0, diff_off, new_ids, seq_lens, block_size)
        if embed is not None:
            emb_table, out = embed
            out[:num_ids] = self.embedding(dst[ids_at: ids_at + num_ids], emb_table)

    def update_block_tables(self, out, table, row_slots, col0, diff_off, new_ids, seq_lens, block_size: int) -> None:
        """A step's block tables from the per-slot table (runner/block_tables.py). Row i's new ids
        new_ids[diff_off[i]:diff_off[i + 1]] are written into table[row_slots[i]] from column
        col0[i]; then out[i] (out is [r, w]) = the first w entries of that row, zero from column
        ceil(seq_lens[i] / block_size) on, and zero for rows whose slot is -1 (padding)."""
        r, w = out.shape
        slots = np.asarray(row_slots[:r], np.int64)
        off = np.asarray(diff_off[: r + 1], np.int64)
        for i in np.flatnonzero(off[1:] > off[:-1]):  # rows with new ids
            c, n = int(col0[i]), int(off[i + 1] - off[i])
            if slots[i] < 0 or c + n > table.shape[1]:
                raise ValueError(f"block tables: row {i} writes slot {slots[i]} columns {c}..{c + n - 1} "
                                 f"of a {table.shape} table")
            table[slots[i], c: c + n] = new_ids[off[i]: off[i + 1]]
        used = -(-np.asarray(seq_lens[:r], np.int64) // block_size)
        keep = (np.arange(w)[None, :] < used[:, None]) & (slots[:, None] >= 0)
        out[...] = np.where(keep, table[np.maximum(slots, 0), :w], 0)

    def embedding(self, ids: np.ndarray, table: np.ndarray) -> np.ndarray:
        return table[ids]  # [T, H]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x / np.sqrt(var + eps)) * weight

    def fused_add_rms_norm(self, x, residual, weight, eps):
        """(rms_norm(x + residual), x + residual): the residual stream and the next layer's input."""
        residual = x + residual
        return self.rms_norm(residual, weight, eps), residual

    def linear(self, x: np.ndarray, weight: np.ndarray, bias=None, feeds_add_norm: bool = False) -> np.ndarray:
        """x @ weight.T (+ bias); weight is [out, in] as in HF checkpoints. feeds_add_norm: see
        CudaBackend.linear (the result here is always the array)."""
        out = self._matmul_t(x, weight)
        if bias is not None:
            out += bias
        return out

    def add_norm_linear(self, x, residual, norm_weight, eps: float, weight, bias=None, act=None):
        """(act(rms_norm(x + residual) @ weight.T + bias), x + residual); see backend/fused.py."""
        return _add_norm_linear(self, x, residual, norm_weight, eps, weight, bias, act)

    def add_norm_qkv_rotary(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                            k_cache, v_cache, slot_mapping, neox: bool):
        """(rotated q, x + residual), k and v into the cache; see backend/fused.py."""
        return _add_norm_qkv_rotary(self, x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                    k_cache, v_cache, slot_mapping, neox)

    def qkv_rotary_attention(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                             k_cache, v_cache, meta, neox: bool, scale: float):
        """(attention output, x + residual), k and v into the cache; see backend/fused.py."""
        return _qkv_rotary_attention(self, x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                     k_cache, v_cache, meta, neox, scale)

    def add_norm_logits(self, x, residual, norm_weight, eps: float, lm_head, out=None):
        """rms_norm(x + residual) @ lm_head.T, float32 [T, V]; see backend/fused.py."""
        return _add_norm_logits(self, x, residual, norm_weight, eps, lm_head, out)

    def logits(self, x: np.ndarray, lm_head: np.ndarray, out=None) -> np.ndarray:
        """[B, H] x [V, H] -> [B, V] float32 logits (into `out`, a float32 [B, V] array, when given)."""
        logits = self._matmul_t(x, lm_head).astype(np.float32, copy=False)
        if out is None:
            return logits
        out[...] = logits
        return out

    @staticmethod
    def _matmul_t(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        # For few rows OpenBLAS runs weight @ x.T about twice as fast as x @ weight.T (measured on the
        # 2-core CI machine at 16 rows); from ~64 rows on the plain form wins.
        if x.shape[0] < 64:
            return np.ascontiguousarray((weight @ x.T).T)
        return x @ weight.T

    def silu_and_mul(self, x: np.ndarray) -> np.ndarray:
        gate, up = np.split(x, 2, axis=-1)  # [T, I] each
        return gate / (1.0 + np.exp(-gate)) * up

    def rotary(self, x: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray, neox: bool) -> np.ndarray:
        """Rotate x [T, heads, head_dim] by each token's position."""
        half = cos_sin.shape[-1] // 2
        cs = cos_sin[positions]  # [T, head_dim]
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        if neox:
            x1, x2 = x[..., :half], x[..., half:]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x2 * cos + x1 * sin
        return out

    def rotary_and_cache_write(self, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, neox: bool):
        """Rotate q and k; write rotated k and v into the paged cache at slot_mapping. Returns q."""
        q = self.rotary(q, positions, cos_sin, neox)
        k = self.rotary(k, positions, cos_sin, neox)
        valid = slot_mapping >= 0
        nkv, hd = k.shape[1:]
        k_cache.reshape(-1, nkv, hd)[slot_mapping[valid]] = k[valid]
        v_cache.reshape(-1, nkv, hd)[slot_mapping[valid]] = v[valid]
        return q

    def paged_attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> np.ndarray:
        """Causal attention of q [T, nh, hd] over each request's cached K/V -> [T, nh, hd]."""
        num_tokens, nh, hd = q.shape
        block_size, nkv = k_cache.shape[1], k_cache.shape[2]
        group = nh // nkv
        out = np.zeros_like(q)
        qsl = meta.query_start_loc
        decodes = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
        if len(decodes) > 1:  # one batched product for all single-token queries instead of a loop
            self._decode_attention(q, k_cache, v_cache, meta, scale, decodes, out)
        for i, (qlen, slen) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            if qlen == 0 or (qlen == 1 and len(decodes) > 1):
                continue
            start = int(qsl[i])
            nblocks = -(-slen // block_size)
            blocks = meta.block_tables[i, :nblocks]
            k = k_cache[blocks].reshape(-1, nkv, hd)[:slen]  # [L, nkv, hd]
            v = v_cache[blocks].reshape(-1, nkv, hd)[:slen]
            qi = q[start:start + qlen].reshape(qlen, nkv, group, hd)  # [n, nkv, g, hd]
            scores = np.einsum("nkgd,lkd->kgnl", qi, k) * scale  # [nkv, g, n, L]
            if qlen > 1:
                # Query row r sits at position slen - qlen + r and sees keys 0..that position.
                q_pos = np.arange(slen - qlen, slen)[:, None]
                scores = np.where(np.arange(slen)[None, :] <= q_pos, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            o = np.einsum("kgnl,lkd->nkgd", probs, v)  # [n, nkv, g, hd]
            out[start:start + qlen] = o.reshape(qlen, nh, hd)
        return out

    @staticmethod
    def _decode_attention(q, k_cache, v_cache, meta, scale, rows: list[int], out) -> None:
        """Requests `rows` each have one query token: gather their K/V padded to the longest context."""
        _, nh, hd = q.shape
        block_size, nkv = k_cache.shape[1], k_cache.shape[2]
        seq_lens = np.asarray([meta.seq_lens_host[i] for i in rows])
        longest = int(seq_lens.max())
        tables = meta.block_tables[rows, : -(-longest // block_size)]  # [D, nb]
        k = k_cache[tables].reshape(len(rows), -1, nkv, hd)[:, :longest]  # [D, L, nkv, hd]
        v = v_cache[tables].reshape(len(rows), -1, nkv, hd)[:, :longest]
        tok = meta.query_start_loc[rows]
        qd = q[tok].reshape(len(rows), nkv, nh // nkv, hd)  # [D, nkv, g, hd]
        # Batched matmuls on transposed views: ~2x faster than the equivalent einsum at these shapes.
        scores = qd @ k.transpose(0, 2, 3, 1)  # [D, nkv, g, hd] @ [D, nkv, hd, L] -> [D, nkv, g, L]
        scores *= scale
        # -inf past each request's context, added as a bias: a boolean-mask assignment costs ~3x more.
        bias = np.where(np.arange(longest)[None, :] >= seq_lens[:, None], -np.inf, 0.0).astype(np.float32)
        scores += bias[:, None, None, :]
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[tok] = (probs @ v.transpose(0, 2, 1, 3)).reshape(len(rows), nh, hd)  # [D, nkv, g, hd]
