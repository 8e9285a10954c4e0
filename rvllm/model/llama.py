"""The Llama-family forward (Llama 2/3/3.x, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3), written once.

It calls backend ops only, so the same code runs on NumPy and on CuPy. Input is one flat ragged
batch: the new tokens of every scheduled request concatenated (see backend AttentionMetadata).
"""
from __future__ import annotations

from dataclasses import dataclass

from rvllm.backend.fused import split_qkv
from rvllm.model.config import ModelSpec


@dataclass
class LayerWeights:
    input_norm: object  # [H]
    qkv: object  # [q_size + 2 * kv_size, H]: q, k and v projections concatenated at load
    qkv_bias: object | None  # [q_size + 2 * kv_size] (Qwen2)
    o_proj: object  # [H, q_size]
    post_norm: object  # [H]
    gate_up: object  # [2 * I, H]: gate and up projections concatenated at load
    down: object  # [H, I]
    q_norm: object | None = None  # [head_dim] (Qwen3)
    k_norm: object | None = None


@dataclass
class ModelWeights:
    embed: object  # [V, H]
    layers: list[LayerWeights]
    final_norm: object  # [H]
    lm_head: object  # [V, H]; the embedding itself when tied
    cos_sin: object  # [max_positions, head_dim] float32 rotary table


class LlamaModel:
    def __init__(self, spec: ModelSpec, weights: ModelWeights, backend):
        self.spec = spec
        self.w = weights
        self.ops = backend
        self.scale = spec.head_dim ** -0.5

    def forward(self, input_ids, positions, kv_caches, meta, num_layers: int | None = None):
        """input_ids, positions: [T]; kv_caches: per layer (k_cache, v_cache) -> hidden [T, H].
        num_layers: run only the first ones (a warm-up: every layer has the same shapes)."""
        hidden, residual = self._layers(input_ids, positions, kv_caches, meta, num_layers)
        x, _ = self.ops.fused_add_rms_norm(hidden, residual, self.w.final_norm, self.spec.rms_norm_eps)
        return x

    def forward_logits(self, input_ids, positions, kv_caches, meta, out=None, num_layers: int | None = None,
                       embedded=None):
        """forward, then compute_logits of every row (a decode step: each row is a request's one new
        token) -> logits [T, V] float32, into `out` when given. The final norm runs inside the
        logits op (one kernel for 1-row steps on CUDA). embedded: the ids' embedding rows [T, H]
        when the caller gathered them (CUDA graphs: runner/graphs.py), else the forward does."""
        hidden, residual = self._layers(input_ids, positions, kv_caches, meta, num_layers, embedded)
        return self.ops.add_norm_logits(hidden, residual, self.w.final_norm, self.spec.rms_norm_eps, self.w.lm_head,
                                        out=out)

    def _layers(self, input_ids, positions, kv_caches, meta, num_layers: int | None, embedded=None):
        """The embedding (unless `embedded` holds it) and the layers -> (the last sublayer's output,
        the residual stream before it)."""
        s, ops = self.spec, self.ops
        # `hidden` is each sublayer's output before it joins the residual stream: add_norm_linear
        # adds it, normalizes and projects in one op (one kernel for decode-sized steps on CUDA).
        # Only add + norm ops read it, so the MLP's may stay a backend's unreduced partial sums
        # (linear's feeds_add_norm: CUDA's K-slices, which the add + norm kernel sums as it reads).
        hidden = ops.embedding(input_ids, self.w.embed) if embedded is None else embedded  # [T, H]
        residual = None
        for layer, (k_cache, v_cache) in zip(self.w.layers[:num_layers], kv_caches):
            o, residual = self._attention(hidden, residual, positions, layer, k_cache, v_cache, meta)  # [T, nh, hd]
            hidden = ops.linear(o.reshape(o.shape[0], s.q_size), layer.o_proj)  # [T, H]
            act, residual = ops.add_norm_linear(hidden, residual, layer.post_norm, s.rms_norm_eps,
                                                layer.gate_up, act="silu_and_mul")  # [T, I]
            hidden = ops.linear(act, layer.down, feeds_add_norm=True)  # [T, H], only ever added to the residual
        return hidden, residual

    def _attention(self, hidden, residual, positions, layer: LayerWeights, k_cache, v_cache, meta):
        """The attention half up to the output projection: (attention output [T, nh, hd], the
        residual stream), this step's k and v written into the cache."""
        s, ops = self.spec, self.ops
        heads = (s.num_heads, s.num_kv_heads, s.head_dim)
        if not s.qk_norm:  # one op (on CUDA, rotary runs inside the qkv product's or attention's kernel)
            return ops.qkv_rotary_attention(hidden, residual, layer.input_norm, s.rms_norm_eps, layer.qkv,
                                            layer.qkv_bias, heads, positions, self.w.cos_sin, k_cache, v_cache,
                                            meta, s.rope_neox, self.scale)
        qkv, residual = ops.add_norm_linear(hidden, residual, layer.input_norm, s.rms_norm_eps,
                                            layer.qkv, layer.qkv_bias)  # [T, q + 2kv]
        q, k, v = split_qkv(qkv, heads)
        q = ops.rms_norm(q, layer.q_norm, s.rms_norm_eps)  # Qwen3: per head, before the rotation
        k = ops.rms_norm(k, layer.k_norm, s.rms_norm_eps)
        q = ops.rotary_and_cache_write(
            q, k, v, positions, self.w.cos_sin, k_cache, v_cache, meta.slot_mapping, s.rope_neox
        )
        return ops.paged_attention(q, k_cache, v_cache, meta, self.scale), residual

    def compute_logits(self, hidden):
        """hidden [B, H] (the rows that sample) -> logits [B, V], float32."""
        return self.ops.logits(hidden, self.w.lm_head)
