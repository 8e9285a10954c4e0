"""Load a model's weights onto a backend (HF safetensors | GGUF | dummy), in the engine process.

Finding the model (`resolve_model`, `ModelSource`) is in source.py, which the front-end process
imports without NumPy; they are re-exported here for the engine's callers.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rvllm.errors import ModelLoadError
from rvllm.model.config import ModelSpec
from rvllm.model.source import ModelSource, resolve_model  # noqa: F401  (re-exported)
from rvllm.model.llama import LayerWeights, ModelWeights
from rvllm.model.rope import cos_sin_table
from rvllm.bf16 import bf16_bits_to_float32
from rvllm.model.safetensors_reader import SafetensorsFile


# ---- weights ------------------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.n = total, label, 0
        self.enabled = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def step(self):
        self.n += 1
        if self.enabled:
            done = int(30 * self.n / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}")
            if self.n == self.total:
                sys.stderr.write(f" {time.monotonic() - self.t0:.1f}s\n")
            sys.stderr.flush()


class _TensorSource:
    """name -> (host array, dtype name) over sharded safetensors files."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise ModelLoadError(f"{index}: cannot read the shard index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
        self.where: dict[str, SafetensorsFile] = {}
        for fname in files:
            f = SafetensorsFile(model_dir / fname)
            for key in f.keys():
                self.where[key] = f

    def get(self, name: str):
        f = self.where.get(name)
        if f is None:
            raise ModelLoadError(f"weights are missing tensor {name!r}")
        return f.get(name)

    def has(self, name: str) -> bool:
        return name in self.where


class _GGUFTensors:
    def __init__(self, gguf_model):
        # read_gguf dequantizes lazily (the front end only wants the tokenizer); here every tensor is
        # needed, and NumPy releases the GIL in the big elementwise ops, so threads use every core.
        names = list(gguf_model.tensors)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            self.tensors = dict(zip(names, pool.map(gguf_model.tensors.__getitem__, names)))

    def get(self, name: str):
        if name not in self.tensors:
            raise ModelLoadError(f"GGUF is missing tensor {name!r}")
        return self.tensors[name], "float32"

    def has(self, name: str) -> bool:
        return name in self.tensors


def load_weights(source: ModelSource, backend, max_positions: int, seed: int = 0) -> ModelWeights:
    """Load every tensor onto `backend` (its `weight` converts to the compute dtype)."""
    spec = source.spec
    backend.prepare_kernels(spec.head_dim)  # compiles (cold cache) while the weights load
    if source.kind == "dummy":
        return _dummy_weights(spec, backend, max_positions, seed)
    tensors = _TensorSource(source.path) if source.kind == "hf" else _GGUFTensors(source.gguf)
    progress = _Progress(spec.num_layers + 2, f"Loading {source.name}")

    def w(name):
        arr, dt = tensors.get(name)
        return backend.weight(arr, dt)

    def cat(names):  # q|k|v, gate|up: concatenated on the device (CUDA) or here (CPU)
        return backend.weight_concat([tensors.get(n) for n in names])

    embed = w("model.embed_tokens.weight")
    progress.step()
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv_names = [attn + "q_proj.", attn + "k_proj.", attn + "v_proj."]
        has_bias = tensors.has(attn + "q_proj.bias")
        layers.append(LayerWeights(
            input_norm=w(p + "input_layernorm.weight"),
            qkv=cat([n + "weight" for n in qkv_names]),
            qkv_bias=cat([n + "bias" for n in qkv_names]) if has_bias else None,
            o_proj=w(attn + "o_proj.weight"),
            post_norm=w(p + "post_attention_layernorm.weight"),
            gate_up=cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
            down=w(p + "mlp.down_proj.weight"),
            q_norm=w(attn + "q_norm.weight") if spec.qk_norm else None,
            k_norm=w(attn + "k_norm.weight") if spec.qk_norm else None,
        ))
        progress.step()
    final_norm = w("model.norm.weight")
    tied = spec.tie_word_embeddings or not tensors.has("lm_head.weight")
    lm_head = embed if tied else w("lm_head.weight")
    progress.step()
    cos_sin = backend.from_host(cos_sin_table(spec, max_positions))
    backend.weights_loaded()
    return ModelWeights(embed, layers, final_norm, lm_head, cos_sin)


def _dummy_weights(spec: ModelSpec, backend, max_positions: int, seed: int) -> ModelWeights:
    """Random weights of the right shapes (std 0.02, norms near 1), generated on the backend's device."""
    counter = iter(range(seed * 100_003, seed * 100_003 + 100_000))

    def mat(*shape):
        return backend.dummy_weight(shape, 0.02, next(counter))

    def norm(n):
        return backend.dummy_weight((n,), 0.02, next(counter), mean=1.0)

    h, qkv_out = spec.hidden_size, spec.q_size + 2 * spec.kv_size
    embed = mat(spec.vocab_size, h)
    layers = [LayerWeights(
        input_norm=norm(h), qkv=mat(qkv_out, h), qkv_bias=mat(qkv_out) if spec.attention_bias else None,
        o_proj=mat(h, spec.q_size), post_norm=norm(h), gate_up=mat(2 * spec.intermediate_size, h),
        down=mat(h, spec.intermediate_size),
        q_norm=norm(spec.head_dim) if spec.qk_norm else None, k_norm=norm(spec.head_dim) if spec.qk_norm else None,
    ) for _ in range(spec.num_layers)]
    final_norm = norm(h)
    lm_head = embed if spec.tie_word_embeddings else mat(spec.vocab_size, h)
    return ModelWeights(embed, layers, final_norm, lm_head, backend.from_host(cos_sin_table(spec, max_positions)))
