"""Tiny random HF model directories (config.json + safetensors) for numerics and engine tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from rvllm.bf16 import bf16_bits_to_float32, float32_to_bf16_bits

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "llama3-scaled": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True, num_key_value_heads=1,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", num_attention_heads=8, num_key_value_heads=2,
                    head_dim=16, tie_word_embeddings=False),
    "qwen3": dict(BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, tie_word_embeddings=True),
}


def random_tensors(cfg: dict, seed: int = 0, lm_head_std: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh

    def mat(*shape, std=0.08):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    arch = cfg["architectures"][0]
    t = {"model.embed_tokens.weight": mat(v, h, std=0.5), "model.norm.weight": norm(h)}
    if not cfg.get("tie_word_embeddings"):
        t["lm_head.weight"] = mat(v, h, std=lm_head_std)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = mat(nh * hd, h, std=0.3)
        t[p + "self_attn.k_proj.weight"] = mat(nkv * hd, h, std=0.3)
        t[p + "self_attn.v_proj.weight"] = mat(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = mat(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = mat(inter, h)
        t[p + "mlp.up_proj.weight"] = mat(inter, h)
        t[p + "mlp.down_proj.weight"] = mat(h, inter)
        if arch == "Qwen2ForCausalLM":
            for n, size in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                t[p + f"self_attn.{n}_proj.bias"] = mat(size, std=0.1)
        if arch == "Qwen3ForCausalLM":
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
    return t


def write_model(root: Path, name: str, seed: int = 0, shards: int = 1, sharp: bool = False) -> tuple[Path, dict, dict]:
    """Writes root/name with config.json and (sharded) safetensors; returns (dir, config, tensors).

    sharp=True gives an untied lm_head with large weights: logits far apart, so greedy choices are
    far from ties and 16-bit rounding on the GPU cannot flip them."""
    cfg = dict(CONFIGS[name], tie_word_embeddings=False) if sharp else CONFIGS[name]
    tensors = random_tensors(cfg, seed, lm_head_std=1.0 if sharp else 0.1)
    if sharp:  # bf16-representable values: a GPU run in bf16 then computes the same model as fp32 references
        tensors = {k: bf16_bits_to_float32(float32_to_bf16_bits(v)) for k, v in tensors.items()}
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(d / fname))
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d, cfg, tensors
