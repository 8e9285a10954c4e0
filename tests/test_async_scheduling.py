"""Async scheduling (step N+1 launched before step N's tokens are read) gives exactly the output of
in-order steps: the same tokens, logprobs and finish reasons under chunked prefill, preemption,
prefix caching, n > 1, seeds, stop tokens, max_tokens of 1, penalties and aborts. On the CPU the
runner's work is synchronous, but the engine, the scheduler's placeholders and the runner's
placeholder inputs follow the same path as on the GPU (where the fill runs as a kernel). The GPU
sampler's device penalty state runs here as its NumPy emulation (tests/test_sampler_gpu.py)."""
from __future__ import annotations

import numpy as np
import pytest

from rvllm import LLM, SamplingParams
from rvllm.engine.request import PLACEHOLDER
from rvllm.sampling.sampler import SamplerOutput
from tests.test_engine import _prompts
from tests.test_sampler_gpu import DeviceState, emulate
from tests.tiny_models import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, cfg, _ = write_model(tmp_path_factory.mktemp("models"), "llama", seed=3)
    return d, cfg


def _generate(d, prompts, params, async_scheduling, **kw):
    llm = LLM(str(d), block_size=4, async_scheduling=async_scheduling, **kw)
    outs = llm.generate(prompts, params)
    got = [[(c.token_ids, c.finish_reason, c.stop_reason,
             None if c.logprobs is None else [{t: round(v.logprob, 5) for t, v in e.items()} for e in c.logprobs])
            for c in o.outputs] for o in outs]
    return got, llm


def _both(d, prompts, params, **kw):
    want, sync_llm = _generate(d, prompts, params, False, **kw)
    got, llm = _generate(d, prompts, params, True, **kw)
    assert sync_llm.engine.runner.num_placeholder_tokens == 0
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    return want, got, llm


@pytest.mark.parametrize("kw", [
    dict(), dict(enable_prefix_caching=False), dict(max_num_batched_tokens=5), dict(num_gpu_blocks_override=20),
    dict(num_gpu_blocks_override=16), dict(max_num_seqs=2),
], ids=["default", "no-prefix-cache", "chunked", "preempt", "context-full", "two-at-a-time"])
def test_greedy_mixed_lengths(tiny, kw):
    """max_tokens of 1 and 2 finish with a step in flight; with 16 blocks of 4 the cache (64 tokens)
    is also the context limit, so two requests end by length there (after 1 and 4 tokens)."""
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])
    lengths = (12,) * 6 if "num_gpu_blocks_override" in kw else (12, 1, 12, 2, 12, 3)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths]
    want, got, llm = _both(d, prompts, params, **kw)
    assert got == want
    assert llm.engine.runner.num_placeholder_tokens > 0  # decode inputs really came from the device
    if "num_gpu_blocks_override" in kw:
        assert llm.engine.stats().num_preemptions > 0


def test_seeded_sampling_n_and_logprobs(tiny):
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])[:4]
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=11 + i, max_tokens=8, ignore_eos=True, logprobs=2)
              for i in range(3)] + [SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=6, ignore_eos=True)]
    want, got, _ = _both(d, prompts, params, num_gpu_blocks_override=24)
    assert got == want


def test_stop_tokens_end_a_request_with_a_step_in_flight(tiny):
    d, cfg = tiny
    prompt = _prompts(cfg["vocab_size"])[4]
    free, _ = _generate(d, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), True)
    toks = free[0][0][0]
    stop_at = toks[4]
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[stop_at])]
    want, got, _ = _both(d, [prompt, prompt], params)
    assert got == want
    assert got[0][0][0] == toks[: toks.index(stop_at) + 1] and got[0][0][1] == "stop"
    assert len(got[1][0][0]) == 12


def test_penalties_fall_back_to_in_order_steps(tiny):
    """The NumPy sampler reads penalized requests' output tokens: no placeholders while they run."""
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])[:3]
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    want, got, llm = _both(d, prompts, params)
    assert got == want
    assert llm.engine.runner.num_placeholder_tokens == 0


class EmulatedGpuSampler:
    """GpuSampler's interface over the NumPy emulation of its kernels and device penalty state:
    installed as the runner's GPU sampler, it makes the engine keep async scheduling on for
    penalized requests, as on CUDA. release=False leaves finished requests' slots to eviction."""

    def __init__(self, vocab: int, num_slots: int, release: bool = True):
        self.state = DeviceState(vocab, num_slots)
        self.calls = 0
        self.releases = release

    def launch(self, logits, meta):
        _, tokens, _, _ = emulate(np.asarray(logits), meta, step=self.calls, state=self.state)
        self.calls += 1
        return _Sampled(tokens)

    def release(self, request_ids) -> None:
        if self.releases:
            self.state.slots.release(request_ids)


class _Sampled:
    def __init__(self, tokens):
        self.token_ids = np.asarray(tokens, np.int32)  # the runner feeds placeholders from these
        self._out = SamplerOutput(list(tokens), [None] * len(tokens))

    def result(self):
        return self._out


@pytest.mark.parametrize("kw,slots,release", [
    (dict(), 256, True), (dict(num_gpu_blocks_override=20), 256, True), (dict(max_num_seqs=2), 2, False),
    (dict(max_num_batched_tokens=5, max_num_seqs=3), 3, True),
], ids=["default", "preempt", "two-slots-evicted", "chunked"])
def test_device_penalty_state_keeps_async_scheduling_exact(tiny, kw, slots, release):
    """With the GPU sampler's penalty state (emulated), penalized requests run pipelined, their
    newest tokens placeholders the device counted, and give the in-order NumPy output."""
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=rep,
                             frequency_penalty=freq, presence_penalty=pres)
              for rep, freq, pres in [(1.3, 0, 0), (1, 0.5, 0), (1, 0, 1.5), (0.8, -0.5, 0.25), (1.2, 1, -1), (2, 0, 0)]]
    want, _ = _generate(d, prompts, params, False, **kw)
    llm = LLM(str(d), block_size=4, async_scheduling=True, **kw)
    llm.engine.runner.gpu_sampler = EmulatedGpuSampler(cfg["vocab_size"], slots, release)
    outs = llm.generate(prompts, params)
    got = [[(c.token_ids, c.finish_reason, c.stop_reason, None) for c in o.outputs] for o in outs]
    assert got == want
    assert llm.engine.runner.num_placeholder_tokens > 0  # every request is penalized: none ran in order
    if "num_gpu_blocks_override" in kw:
        assert llm.engine.stats().num_preemptions > 0


def test_abort_with_a_step_in_flight(tiny):
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])[:3]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(str(d), block_size=4, async_scheduling=async_scheduling)
        core = llm.engine
        for i, p in enumerate(prompts):
            core.add_request(str(i), p, params)
        tokens: dict[str, list[int]] = {str(i): [] for i in range(3)}
        steps = 0
        while core.has_unfinished_requests():
            for delta in core.step():
                tokens[delta.request_id].extend(delta.new_token_ids)
            steps += 1
            if steps == 4:
                core.abort_requests(["1"])
        stats = core.stats()
        assert stats.kv_cache_usage == 0.0
        # The aborted request's record counts the tokens it delivered, not a placeholder in flight.
        by_count = sorted(r.generation_tokens for r in stats.finished)
        assert by_count == sorted(len(t) for t in tokens.values())
        runs.append(tokens)
    assert runs[1]["0"] == runs[0]["0"] and runs[1]["2"] == runs[0]["2"] and len(runs[1]["0"]) == 10
    assert len(runs[1]["1"]) < 10  # aborted part-way, whatever arrived before is a prefix of the full run
    assert runs[0]["1"][: len(runs[1]["1"])] == runs[1]["1"]


def test_placeholders_never_reach_outputs_or_hashes(tiny):
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])
    llm = LLM(str(d), block_size=4, async_scheduling=True)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert all(PLACEHOLDER not in c.token_ids for o in outs for c in o.outputs)
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert all(len(o.outputs[0].token_ids) == 9 for o in outs)


def test_server_with_async_scheduling_answers_as_in_order(smollm2_path):
    """`rvllm serve --async-scheduling` (the engine process pipelines steps) returns the same
    completions as the in-order server, with stops, n > 1 and logprobs. One request at a time: with
    concurrent ones, arrival order would change the batches, and batch shape changes float32 BLAS
    rounding (a near-tie could then differ for reasons other than scheduling)."""
    import httpx

    from tests.server_fixture import MODEL_NAME, start_server, stop_server

    bodies = [
        {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0},
        {"prompt": "List three colors:", "max_tokens": 20, "temperature": 0, "stop": ["\n\n", "4."]},
        {"prompt": "Once upon a time", "max_tokens": 9, "temperature": 0, "logprobs": 2},
        {"prompt": "def add(a, b):", "max_tokens": 16, "n": 2, "temperature": 0.8, "seed": 5},
        {"prompt": "Hello", "max_tokens": 1, "temperature": 0},
    ]
    answers = []
    for flag in ("--no-async-scheduling", "--async-scheduling"):
        server = start_server(smollm2_path, flag)
        try:
            def ask(body):
                r = httpx.post(server.v1 + "/completions", json={"model": MODEL_NAME, **body}, timeout=120)
                assert r.status_code == 200, r.text
                return [(c["text"], c["finish_reason"], c["logprobs"]) for c in r.json()["choices"]]

            answers.append([ask(body) for body in bodies])
        finally:
            stop_server(server)
    assert answers[1] == answers[0]
    assert answers[0][4][0][1] == "length" and len(answers[0][3]) == 2


def test_step_profiler_records_host_phases(tiny):
    """bench/latency.py --profile's instrument on the CPU: one row per step with the host phases
    (the device phases exist only on CUDA)."""
    from rvllm.runner.profiling import HOST_PHASES, StepProfiler

    d, cfg = tiny
    for async_scheduling in (False, True):
        llm = LLM(str(d), block_size=4, async_scheduling=async_scheduling)
        runner = llm.engine.runner
        runner.profiler = StepProfiler(llm.engine.backend)
        llm.generate(_prompts(cfg["vocab_size"])[:2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        rows = runner.profiler.rows
        assert len(rows) >= 6  # a prefill and five decodes each (the second prompt waits a step for the shared prefix)
        assert all(set(HOST_PHASES) <= set(r) and all(r[p] >= 0 for p in HOST_PHASES) for r in rows)
        summary = runner.profiler.summary()
        assert set(summary) == set(HOST_PHASES) and summary["launch"][0] > 0


def test_a_reused_request_id_gets_nothing_of_an_aborted_step(tiny):
    """An aborted request's in-flight step (a prompt chunk with prompt logprobs) finishes after a new
    request took the same id: the new request must not receive the old one's prompt logprobs."""
    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])
    llm = LLM(str(d), block_size=4, async_scheduling=True, max_num_batched_tokens=5)
    core = llm.engine
    core.add_request("a", prompts[5], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1))
    core.step()  # the first chunk is launched, not read
    core.abort_requests(["a"])
    core.add_request("a", prompts[1][:4], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    got = []
    while core.has_unfinished_requests():
        got += [dl for dl in core.step() if dl.request_id == "a"]
    assert all(dl.prompt_logprobs is None for dl in got)
    assert sum(len(dl.new_token_ids) for dl in got) == 3
