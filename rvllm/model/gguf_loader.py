"""GGUF file -> ModelSpec, float32 tensors under HF names, and an HF tokenizer.json.

The header is parsed here rather than with gguf.GGUFReader: the reader builds a numpy view per
array element, which takes ~2 s on the 98k tokenizer strings of SmolLM2 alone. Tensor bytes are
mmapped and dequantized with vectorized numpy (Q8_0/Q4_0/Q4_1 inline, K-quants via gguf.quants).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from rvllm.errors import ModelLoadError
from rvllm.model.config import ModelSpec, spec_from_hf_config
from rvllm.model.gguf_vocab import tokenizer_files
from rvllm.model.rope import inv_frequencies

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                   QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFModel:
    path: Path
    spec: ModelSpec
    tensors: Mapping[str, np.ndarray]  # HF names -> float32 [out, in], dequantized on access
    tokenizer_json: str  # an HF `tokenizers` JSON rebuilt from tokenizer.ggml.*
    tokenizer_config: dict  # chat_template, bos_token, eos_token, add_bos_token
    generation_config: dict  # eos_token_id (int or list), bos_token_id
    metadata: dict = field(default_factory=dict, repr=False)


class _Header:
    """Cursor over the mmapped file: metadata key/values and tensor infos."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, vtype: int):
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar(10)
        if self.pos + n > len(self.buf):
            raise IndexError("string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            return self.scalar(vtype)
        etype, n = self.scalar(4), self.scalar(10)
        if etype in _NP:  # numeric arrays (token types, scores) in one read
            arr = np.frombuffer(self.buf, dtype=_NP[etype], count=n, offset=self.pos).copy()
            self.pos += arr.nbytes
            return arr
        return [self.value(etype) for _ in range(n)]


def _parse(path: Path, buf) -> tuple[dict, dict]:
    """-> (metadata, {gguf tensor name: (type, shape as numpy [rows..., cols], absolute offset, nbytes)})."""
    h = _Header(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    h.pos = 4
    version = h.scalar(4)
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2, 3)")
    n_tensors, n_kv = h.scalar(10), h.scalar(10)
    if n_tensors > len(buf) or n_kv > len(buf):
        raise ModelLoadError(f"{path}: corrupt GGUF header (claims {n_tensors} tensors, {n_kv} keys)")
    meta = {}
    for _ in range(n_kv):
        key = h.string()
        meta[key] = h.value(h.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.scalar(10) for _ in range(h.scalar(4))]
        infos.append((name, h.scalar(4), dims, h.scalar(10)))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-h.pos // align) * align
    tensors = {}
    for name, type_id, dims, offset in infos:
        if type_id not in QT._value2member_map_ or QT(type_id) not in SUPPORTED_TYPES:
            kind = QT(type_id).name if type_id in QT._value2member_map_ else f"unknown type id {type_id}"
            raise ModelLoadError(f"{path}: tensor {name!r} has type {kind}, which rvllm cannot dequantize; "
                                 f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")
        qtype = QT(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ModelLoadError(f"{path}: tensor {name!r} row of {dims[0]} is not a multiple of the {qtype.name} block")
        nbytes = math.prod(dims) // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ModelLoadError(f"{path}: truncated: tensor {name!r} needs bytes up to {start + nbytes}, "
                                 f"the file has {len(buf)}")
        tensors[name] = (qtype, tuple(reversed(dims)), start, nbytes)
    return meta, tensors


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)  # [nb, 2] bytes -> [nb, 1] float32


def _dequantize(buf, qtype: QT, shape: tuple, start: int, nbytes: int) -> np.ndarray:
    """Bit-identical to gguf.quants.dequantize; the common 32-element block types are inlined for speed."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    if qtype == QT.F32:
        return raw.view(np.float32).reshape(shape).copy()  # copy: don't pin the mmap
    if qtype == QT.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype not in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        rows = raw.reshape(-1, shape[-1] // block * type_size)
        return gguf_dequantize(rows, qtype).astype(np.float32, copy=False).reshape(shape)
    blocks = raw.reshape(-1, type_size)  # [nb, bytes]: f16 scale (, f16 min), quants
    d = _f16(blocks[:, 0:2])
    out = np.empty((blocks.shape[0], 32), np.float32)
    if qtype == QT.Q8_0:
        np.multiply(blocks[:, 2:].view(np.int8), d, out=out)
    else:  # 4-bit: low nibbles hold elements 0..15, high nibbles 16..31
        qs = blocks[:, -16:]
        lo, hi = qs & np.uint8(15), qs >> np.uint8(4)
        if qtype == QT.Q4_0:  # symmetric around 8
            lo, hi = lo.view(np.int8) - np.int8(8), hi.view(np.int8) - np.int8(8)
        np.multiply(lo, d, out=out[:, :16])
        np.multiply(hi, d, out=out[:, 16:])
        if qtype == QT.Q4_1:
            out += _f16(blocks[:, 2:4])
    return out.reshape(shape)


_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def _hf_name(path: Path, name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(f"{path}: tensor {name!r} is not part of a supported Llama-family model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permute (HF neox-order rows -> interleaved pairs per head)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _spec(path: Path, meta: dict, tensors: dict) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    a = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    try:
        hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
        head_dim = int(a("attention.key_length") or hidden // heads)
        vocab = a("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) \
            or tensors["token_embd.weight"][1][0]
        cfg = dict(
            architectures=[ARCHITECTURES[arch]], vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(a("feed_forward_length")), num_hidden_layers=int(a("block_count")),
            num_attention_heads=heads, num_key_value_heads=int(a("attention.head_count_kv") or heads),
            head_dim=head_dim, rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(a("rope.freq_base", 10000.0)),
            max_position_embeddings=int(a("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensors, torch_dtype="float32")
    except (TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: GGUF metadata is missing {arch}.* shape keys ({e})") from None
    if int(a("rope.dimension_count") or head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary (rope.dimension_count {a('rope.dimension_count')} "
                             f"< head_dim {head_dim}) is not supported")
    scaling = a("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{path}: rope scaling {scaling!r} is not supported (linear, llama3)")
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id") if k in meta]
    cfg["eos_token_id"] = list(dict.fromkeys(eos))
    cfg["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    return spec_from_hf_config(cfg, str(path))


def _llama3_scaling(path: Path, spec: ModelSpec, factors: np.ndarray) -> dict:
    """Llama 3.x GGUFs carry rope scaling only as per-frequency divisors (rope_freqs); recover HF's dict.
    With Llama 3's low/high frequency factors (1, 4), one in-between divisor pins the original context."""
    base = inv_frequencies(spec.replace(rope_scaling=None))
    factor = float(factors.max())
    origs = [8192]
    medium = np.flatnonzero((factors > 1.0001) & (factors < factor * 0.9999))
    if medium.size and factor > 1:
        i = medium[0]
        smooth = (1 / factors[i] - 1 / factor) / (1 - 1 / factor)
        origs.insert(0, round(2 * math.pi / base[i] * (3 * smooth + 1)))
    for orig in origs:
        cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": int(orig)}
        if np.allclose(base / factors, inv_frequencies(spec.replace(rope_scaling=cand)), rtol=1e-4, atol=0):
            return cand
    raise ModelLoadError(f"{path}: rope_freqs tensor matches no llama3 rope scaling rvllm knows")


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Parse and dequantize a GGUF file; every problem raises ModelLoadError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: empty file
        raise ModelLoadError(f"{path}: cannot open ({e})") from None
    try:
        meta, infos = _parse(path, buf)
    except (struct.error, IndexError, ValueError, KeyError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF header ({e})") from None
    spec = _spec(path, meta, infos)
    rope_freqs = infos.pop("rope_freqs.weight", None)
    if rope_freqs is not None:
        spec = spec.replace(rope_scaling=_llama3_scaling(path, spec, _dequantize(buf, *rope_freqs)))
    names = {g: _hf_name(path, g) for g in infos}

    def load(gname: str) -> np.ndarray:
        w = _dequantize(buf, *infos[gname])
        if spec.architecture == "LlamaForCausalLM" and gname.split(".")[-2] in ("attn_q", "attn_k"):
            w = unpermute_rotary(w, spec.num_heads if ".attn_q." in gname else spec.num_kv_heads)
        return w

    tensors = _LazyTensors({hf: g for g, hf in names.items()}, load)
    tok_json, tok_cfg, gen_cfg = tokenizer_files(path, meta, spec)
    return GGUFModel(path, spec, tensors, tok_json, tok_cfg, gen_cfg, meta)


class _LazyTensors(Mapping):
    """HF name -> float32 tensor, dequantized when asked for and not kept: the front-end process
    reads a GGUF only for its tokenizer and limits, and must not hold the model (540 MB for SmolLM2)."""

    def __init__(self, hf_to_gguf: dict[str, str], load):
        self._names, self._load = hf_to_gguf, load

    def __getitem__(self, name: str) -> np.ndarray:
        return self._load(self._names[name])

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
