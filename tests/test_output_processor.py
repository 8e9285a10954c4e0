"""Front-end output processing on real SmolLM2 tokens: stop strings across token boundaries,
held-back text while streaming, include_stop_str_in_output, stop tokens, n-way fan-out."""
from __future__ import annotations

import pytest

from rvllm import SamplingParams
from rvllm.engine.messages import RequestDelta
from rvllm.engine.output_processor import OutputProcessor


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from rvllm.model.gguf_loader import read_gguf
    from rvllm.tokenizer import Tokenizer

    return Tokenizer.from_gguf(read_gguf(smollm2_path))


def stream(tok, text, params, finish_at_end=True):
    """Feeds `text`'s tokens one per step; returns (deltas streamed, final output, child ids to finish)."""
    proc = OutputProcessor(tok)
    prompt = tok.encode("Say something:")
    [(cid, _)] = proc.add_request("r", "Say something:", prompt, params)
    ids = tok.encode(text, add_special_tokens=False)
    pieces, finished_by_front_end = [], []
    for i, t in enumerate(ids):
        last = i == len(ids) - 1
        _, to_finish = proc.process([RequestDelta(cid, [t], finish_reason="length" if last and finish_at_end else None)])
        finished_by_front_end += to_finish
        out = proc.make_output("r", delta=True)
        if out is not None:
            pieces.append(out.outputs[0].text)
        if to_finish:
            break
    return pieces, proc, finished_by_front_end


def test_stop_string_split_across_tokens(tok):
    text = "The answer is forty-two. The end of the story."
    stop = "forty-two"
    ids = tok.encode(text, add_special_tokens=False)
    # The stop string must really span several tokens for this test to mean anything.
    assert not any(stop in tok.decode([t]) for t in ids)
    pieces, proc, to_finish = stream(tok, text, SamplingParams(stop=[stop], max_tokens=100))
    assert "".join(pieces) == "The answer is "
    assert to_finish == ["r"]  # the engine is told to finish the request
    final = proc.make_output("r", delta=False).outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop and final.text == "The answer is "


def test_text_that_may_start_a_stop_string_is_held_back(tok):
    text = "alpha beta gamma delta"
    pieces, proc, to_finish = stream(tok, text, SamplingParams(stop=["gamma ray"], max_tokens=100))
    # While "gamma" could begin "gamma ray" it is not streamed; once "delta" rules it out, it is.
    streamed = ""
    for p in pieces:
        streamed += p
        assert not streamed.endswith("gam") and not streamed.endswith("gamma")
    assert "".join(pieces) == text and to_finish == []


def test_include_stop_str_in_output(tok):
    text = "one two three four"
    pieces, proc, _ = stream(tok, text, SamplingParams(stop=["three"], include_stop_str_in_output=True))
    assert "".join(pieces) == "one two three"


def test_stop_token_text_is_dropped_unless_asked(tok):
    proc = OutputProcessor(tok)
    prompt = tok.encode("Hi")
    ids = tok.encode("Hello there", add_special_tokens=False)
    for include in (False, True):
        rid = f"r{include}"
        [(cid, _)] = proc.add_request(rid, "Hi", prompt, SamplingParams(include_stop_str_in_output=include))
        stop_id = ids[-1]
        proc.process([RequestDelta(cid, ids[:-1]), RequestDelta(cid, [stop_id], finish_reason="stop",
                                                                 stop_reason=stop_id)])
        out = proc.make_output(rid, delta=False).outputs[0]
        assert out.token_ids == ids  # token ids keep the stop token
        assert out.text == (tok.decode(ids) if include else tok.decode(ids[:-1]))


def test_n_children_are_fanned_out_and_gathered(tok):
    proc = OutputProcessor(tok)
    children = proc.add_request("p", "x", [1, 2, 3], SamplingParams(n=3, seed=10, max_tokens=2))
    assert [c for c, _ in children] == ["0_p", "1_p", "2_p"]
    assert [p.seed for _, p in children] == [10, 11, 12]  # each sample its own stream, as vLLM does
    a, b = tok.encode("Hello", add_special_tokens=False)[0], tok.encode(" world", add_special_tokens=False)[0]
    proc.process([RequestDelta("0_p", [a]), RequestDelta("2_p", [b], finish_reason="length")])
    out = proc.make_output("p", delta=True)
    assert [c.index for c in out.outputs] == [0, 2] and not out.finished
    proc.process([RequestDelta("0_p", [b], finish_reason="length"), RequestDelta("1_p", [a], finish_reason="length")])
    out = proc.make_output("p", delta=False)
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert out.outputs[0].text == "Hello world"
