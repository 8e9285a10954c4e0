"""The engine end to end on a tiny model: continuous batching, prefix caching, chunked prefill and
preemption must not change greedy output; seeded sampling reproduces; stats move."""
from __future__ import annotations

import numpy as np
import pytest

from rvllm import LLM, SamplingParams
from tests.reference import ReferenceModel
from tests.tiny_models import write_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, cfg, tensors = write_model(tmp_path_factory.mktemp("models"), "llama", seed=3)
    return d, cfg, tensors


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    shared = list(rng.integers(3, vocab, 40))  # a common prefix so the prefix cache has something to hit
    prompts = [shared + list(rng.integers(3, vocab, n)) for n in (1, 7, 23)]
    prompts += [list(rng.integers(3, vocab, n)) for n in (2, 17, 60)]
    return [[int(t) for t in p] for p in prompts]


def _run(model_dir, prompts, params=GREEDY, **kw):
    llm = LLM(str(model_dir), block_size=4, **kw)
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], llm


def test_greedy_matches_reference_model(tiny):
    d, cfg, tensors = tiny
    prompts = _prompts(cfg["vocab_size"])
    got, _ = _run(d, prompts)
    ref = ReferenceModel(cfg, tensors)
    for p, g in zip(prompts, got):
        assert g == ref.greedy(p, 12)


@pytest.mark.parametrize("kw", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=5),  # chunked prefill: every prompt is cut into pieces
    dict(num_gpu_blocks_override=20),  # tiny cache: preemption by recompute
    dict(max_num_seqs=1),
], ids=["no-prefix-cache", "chunked", "preempt", "one-at-a-time"])
def test_scheduling_does_not_change_greedy_output(tiny, kw):
    d, cfg, _ = tiny
    prompts = _prompts(cfg["vocab_size"])
    alone = [_run(d, [p])[0][0] for p in prompts]
    got, llm = _run(d, prompts, **kw)
    assert got == alone
    stats = llm.engine.stats()
    if "num_gpu_blocks_override" in kw:
        assert stats.num_preemptions > 0
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_cache_usage == 0.0


def test_prefix_cache_hits_and_identical_output(tiny):
    d, cfg, _ = tiny
    prompts = _prompts(cfg["vocab_size"])[:3]
    llm = LLM(str(d), block_size=4)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    before = llm.engine.stats()
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    after = llm.engine.stats()
    assert again == first
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 3 * 40 - 4


def test_seeded_sampling_reproduces_across_batches(tiny):
    d, cfg, _ = tiny
    prompts = _prompts(cfg["vocab_size"])
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    alone, _ = _run(d, [prompts[0]], seeded)
    mixed, _ = _run(d, [prompts[3], prompts[0], prompts[5]], [other, seeded, other])
    assert mixed[1] == alone[0]
    preempted, _ = _run(d, [prompts[3], prompts[0], prompts[5]], [other, seeded, other], num_gpu_blocks_override=20)
    assert preempted[1] == alone[0]


def test_n_samples_share_the_prompt(tiny):
    d, cfg, _ = tiny
    llm = LLM(str(d), block_size=4)
    out = llm.generate([_prompts(cfg["vocab_size"])[5]],
                       SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds per sample
    assert llm.engine.stats().prefix_cache_hits > 0


def test_max_tokens_eos_and_stop_token_ids(tiny):
    d, cfg, _ = tiny
    prompt = _prompts(cfg["vocab_size"])[4]
    free_run, llm = _run(d, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    toks = free_run[0]
    stop_at = toks[5]
    first = toks.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == toks[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == toks[:3] and out.finish_reason == "length"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                stop_token_ids=[stop_at]))[0].outputs[0]
    assert len(out.token_ids) == 12 and stop_at not in out.token_ids  # min_tokens suppresses the stop token


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=5), dict(num_gpu_blocks_override=20)],
                         ids=["default", "chunked", "preempt"])
def test_prompt_logprobs_match_reference(tiny, kw):
    d, cfg, tensors = tiny
    prompts = _prompts(cfg["vocab_size"])
    ref = ReferenceModel(cfg, tensors)
    outs = LLM(str(d), block_size=4, **kw).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2))
    for p, o in zip(prompts, outs):
        logits = ref.forward(p, 0, ref.new_cache())
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for pos in range(1, len(p)):
            entry = o.prompt_logprobs[pos]
            assert abs(entry[p[pos]].logprob - lp[pos - 1, p[pos]]) < 1e-4
            top = sorted(entry.items(), key=lambda kv: kv[1].rank)
            assert [t for t, _ in top if _.rank <= 2][:2] == list(np.argsort(-lp[pos - 1])[:2])
