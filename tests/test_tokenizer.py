"""Tokenizer on the real SmolLM2 vocabulary: round trips, the chat template, incremental detokenization."""
from __future__ import annotations

import json
import random
from datetime import datetime

import pytest
from hypothesis import given, settings, strategies as st

from rvllm.model.gguf_loader import read_gguf
from rvllm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "Grüß Gott, naïve café — déjà vu. Ça va?",
    "你好，世界！今天天气很好。日本語のテキストも。한국어 문장입니다.",
    "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया",
    "Emoji: 🤗🎉👩‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 👍🏽 and math ∑∫√∞ ≠ ≤",
    "code:\n\tdef f(x):\n\t\treturn x**2  # squares\n\n\n  trailing   spaces   ",
    "",
]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smol(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(smollm2_path))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    assert all(0 <= i < smol.vocab_size for i in ids)


def test_special_tokens_and_bos(smol):
    assert (smol.bos_token_id, smol.eos_token_id, smol.vocab_size) == (1, 2, 49152)
    assert smol.all_special_ids == list(range(17))  # the 17 control tokens of SmolLM2
    # SmolLM2 does not add BOS (tokenizer.ggml.add_bos_token = false, as its HF tokenizer).
    assert smol.encode("Hello")[0] != 1 and smol.encode("Hello") == smol.encode("Hello", add_special_tokens=False)
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and smol.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "user", "Ċ"]
    assert smol.decode(ids) == "user\nHi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"
    # SmolLM2 splits every digit (llama.cpp's "smollm" pre-tokenizer, StarCoder style).
    assert smol.convert_ids_to_tokens(smol.encode("2024")) == ["2", "0", "2", "4"]
    with_bos = Tokenizer(smol.hf, {**smol.config, "add_bos_token": True})
    assert with_bos.encode("Hi") == [1] + smol.encode("Hi")
    assert with_bos.encode("<|im_start|>Hi") == smol.encode("<|im_start|>Hi")  # not doubled
    assert with_bos.encode("Hi", add_special_tokens=False) == smol.encode("Hi")


def test_smollm2_chat_template(smol):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert smol.apply_chat_template(msgs) == (
        SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert smol.apply_chat_template(msgs, add_generation_prompt=False) == (
        SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    convo = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": "Hello! "}]
    assert smol.apply_chat_template(convo, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\nHello! <|im_end|>\n")
    # continue_final_message cuts the end-of-turn after the last message (HF semantics, spacing kept).
    assert smol.apply_chat_template(convo, add_generation_prompt=False, continue_final_message=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi\nthere<|im_end|>\n"
        "<|im_start|>assistant\nHello! ")
    with pytest.raises(ValueError, match="not compatible"):
        smol.apply_chat_template(convo, continue_final_message=True)
    with pytest.raises(ValueError, match="only 'text'"):
        smol.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    # The rendered prompt tokenizes with <|im_start|> as one id and starts the assistant turn.
    ids = smol.encode(smol.apply_chat_template(msgs))
    assert ids[0] == 1 and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> ass istant \\n


def test_template_helpers_and_errors(smol):
    render = lambda src, **kw: smol.apply_chat_template([{"role": "user", "content": "é<b>"}],  # noqa: E731
                                                        chat_template=src, **kw)
    assert render("{{ messages | tojson }}") == '[{"role": "user", "content": "é<b>"}]'
    assert render("{{ tools | tojson(indent=1) }}", tools=[{"a": 1}]) == json.dumps([{"a": 1}], indent=1)
    assert render("{{ strftime_now('%Y') }}") == str(datetime.now().year)
    assert render("{{ bos_token }}|{{ eos_token }}|{{ custom }}", custom=7) == "<|im_start|>|<|im_end|>|7"
    assert render("{% for m in messages %}\n    {% if m %}{{ m.role }}!{% endif %}\n{% endfor %}") == "user!"
    assert render("{% generation %}x{% endgeneration %}") == "x"
    with pytest.raises(ValueError, match="chat template error: no tools here"):
        render("{{ raise_exception('no tools here') }}")
    with pytest.raises(ValueError, match="syntax error"):
        render("{% for %}")
    with pytest.raises(ValueError, match="chat template error"):
        render("{{ messages[0].content + 1 }}")
    bare = Tokenizer(smol.hf, {"bos_token": "<|im_start|>"})
    with pytest.raises(ValueError, match="no chat template.*--chat-template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_access(smol):
    assert "class" not in smol.apply_chat_template([], chat_template="{{ ''.__class__ }}")
    for src in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                "{{ messages.append(1) }}",  # immutable sandbox: no mutating the caller's lists
                "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(ValueError, match="chat template error"):
            smol.apply_chat_template([], chat_template=src)


def test_from_dir_named_templates(tmp_path, smol, smollm2_path):
    m = read_gguf(smollm2_path)
    (tmp_path / "tokenizer.json").write_text(m.tokenizer_json, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": [{"name": "default", "template": "D{{ messages | length }}"},
                          {"name": "tool_use", "template": "T{{ (tools or []) | length }}"}]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.encode("héllo") == smol.encode("héllo")
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "D1"
    assert tok.apply_chat_template(msgs, tools=[{}, {}]) == "T2"
    assert tok.apply_chat_template(msgs, chat_template="tool_use") == "T0"
    assert tok.apply_chat_template(msgs, chat_template="raw {{ 1 + 1 }}") == "raw 2"


def _stream(tok: Tokenizer, ids: list[int], chunks: list[int], prompt=(), skip=True):
    d = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    deltas, pos, i = [], 0, 0
    while pos < len(ids):
        n = chunks[i % len(chunks)] if chunks else 1
        deltas.append(d.add(ids[pos : pos + n]))
        pos, i = pos + n, i + 1
        assert d.prefix_offset >= d.num_prompt_tokens - 5 and len(d.ids) - d.prefix_offset <= 24  # O(window)
    return d, deltas


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(TEXTS + ["🤗", "👩‍👧", "中文", "é", " ", "\n"]), min_size=1, max_size=12),
       chunks=st.lists(st.integers(1, 4), max_size=5), special=st.booleans())
def test_incremental_matches_full_decode_on_text(smol, pieces, chunks, special):
    text = ("<|im_end|>" if special else "").join(pieces)
    ids = smol.encode(text)
    for skip in (True, False):
        d, deltas = _stream(smol, ids, chunks, prompt=smol.encode("<|im_start|>assistant\n"), skip=skip)
        assert "".join(deltas) == d.text == smol.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in x for x in deltas)  # never half a character
        assert d.flush() == "" and d.output_token_ids == ids


def test_incremental_on_byte_fragments(smol):
    # Token ids drawn at random (many are lone UTF-8 bytes) mixed with emoji and CJK tokens.
    rng = random.Random(0)
    frag = [i for s in ("🤗", "👩‍👧", "你好", "é", "🇫🇷") for i in smol.encode(s)]
    for _ in range(200):
        ids = [rng.choice(frag) if rng.random() < 0.6 else rng.randrange(smol.vocab_size)
               for _ in range(rng.randrange(1, 50))]
        d, deltas = _stream(smol, ids, [rng.randint(1, 3)])
        d.flush()  # held-back incomplete bytes come out as U+FFFD, as the full decode shows them
        assert d.text == smol.decode(ids)


def test_incremental_holds_back_split_emoji(smol):
    ids = smol.encode("a🤗b")
    d = IncrementalDetokenizer(smol, [])
    got = [d.add([i]) for i in ids]
    assert "".join(got) == "a🤗b" and "🤗" in got and len(ids) > 3  # the emoji spans several byte tokens
    cut = IncrementalDetokenizer(smol, [])
    assert "".join(cut.add([i]) for i in ids[:-2]) == "a" and cut.flush() == "\ufffd"
