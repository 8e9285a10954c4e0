"""An independent float64 Llama-family forward: contiguous KV, no paging, no code shared with rvllm/model.

Weights are HF-named NumPy arrays; `cfg` is an HF config.json dict.
"""
from __future__ import annotations

import math

import numpy as np


class ReferenceModel:
    def __init__(self, cfg: dict, tensors: dict[str, np.ndarray]):
        self.cfg = cfg
        self.t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads", self.nh)
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.nh
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.layers = cfg["num_hidden_layers"]
        self.qk_norm = cfg["architectures"][0] == "Qwen3ForCausalLM"
        self.inv_freq = self._inv_freq()

    def _inv_freq(self):
        c, d = self.cfg, self.hd
        inv = 1.0 / (c.get("rope_theta", 10000.0) ** (np.arange(0, d, 2) / d))
        rs = c.get("rope_scaling") or {}
        if (rs.get("rope_type") or rs.get("type")) == "llama3":
            f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
            out = []
            for x in inv:
                wl = 2 * math.pi / x
                if wl < old / hi:
                    out.append(x)
                elif wl > old / lo:
                    out.append(x / f)
                else:
                    s = (old / wl - lo) / (hi - lo)
                    out.append((1 - s) * x / f + s * x)
            inv = np.array(out)
        return inv

    def _norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):  # x [n, heads, hd], rotate-half (neox) form
        ang = np.outer(pos, self.inv_freq)  # [n, hd/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        half = self.hd // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def new_cache(self):
        return [([], []) for _ in range(self.layers)]

    def forward(self, ids: list[int], start: int, cache) -> np.ndarray:
        """Run tokens `ids` at positions start.. with `cache` holding positions < start -> logits [n, V]."""
        t, n = self.t, len(ids)
        pos = np.arange(start, start + n)
        x = t["model.embed_tokens.weight"][ids]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._norm(x, t[p + "input_layernorm.weight"])

            def proj(name):
                y = h @ t[p + f"self_attn.{name}.weight"].T
                b = t.get(p + f"self_attn.{name}.bias")
                return y + b if b is not None else y

            q = proj("q_proj").reshape(n, self.nh, self.hd)
            k = proj("k_proj").reshape(n, self.nkv, self.hd)
            v = proj("v_proj").reshape(n, self.nkv, self.hd)
            if self.qk_norm:
                q = self._norm(q, t[p + "self_attn.q_norm.weight"])
                k = self._norm(k, t[p + "self_attn.k_norm.weight"])
            q, k = self._rope(q, pos), self._rope(k, pos)
            ks, vs = cache[i]
            ks.append(k)
            vs.append(v)
            K, V = np.concatenate(ks), np.concatenate(vs)  # [L, nkv, hd]
            L = K.shape[0]
            rep = self.nh // self.nkv
            K, V = np.repeat(K, rep, axis=1), np.repeat(V, rep, axis=1)
            s = np.einsum("nhd,lhd->hnl", q, K) / math.sqrt(self.hd)
            mask = np.arange(L)[None, :] > pos[:, None]
            s = np.where(mask[None], -np.inf, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hnl,lhd->nhd", s, V).reshape(n, -1)
            x = x + o @ t[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, t[p + "post_attention_layernorm.weight"])
            g = h @ t[p + "mlp.gate_proj.weight"].T
            u = h @ t[p + "mlp.up_proj.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
        x = self._norm(x, t["model.norm.weight"])
        head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
        return x @ head.T

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        cache = self.new_cache()
        logits = self.forward(prompt, 0, cache)[-1]
        out = []
        for _ in range(steps):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = self.forward([tok], len(prompt) + len(out) - 1, cache)[-1]
        return out
