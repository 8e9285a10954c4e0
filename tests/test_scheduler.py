"""Scheduler properties with a fake runner that really pages KV through the block tables.

The fake runner writes each scheduled token into its cache slot (request.block_ids), then reads every
request's whole context back through its block table and checks it is the request's tokens; the
"model" then samples from that context. So a wrongly shared, evicted or overwritten block fails here,
and preempted, chunked or prefix-hit runs must reproduce the unconstrained greedy outputs exactly.
"""
from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from rvllm.engine.request import Request, RequestStatus
from rvllm.engine.scheduler import Scheduler
from rvllm.sampling_params import SamplingParams


def fake_model(context: list[int]) -> int:
    return (sum(context[-3:]) * 31 + len(context)) % 1000 + 3


def reference_outputs(prompt: list[int], max_tokens: int, eos: tuple[int, ...] = ()) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(fake_model(tokens))
        tokens.append(out[-1])
        if out[-1] in eos:
            break
    return out


class FakeRunner:
    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.bs = sched.block_size
        self.kv: dict[int, list] = {}  # block id -> the token in each slot
        self.steps = []

    def step(self) -> list[Request]:
        sched = self.sched
        running_before = [r.request_id for r in sched.running]
        out = sched.schedule()
        self.steps.append(out)
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
        # Victims are the most recently started running requests, newest first; no admission that step.
        k = len(out.preempted_req_ids)
        assert out.preempted_req_ids == running_before[::-1][:k]
        if k:
            assert set(ids) <= set(running_before) - set(out.preempted_req_ids)
        for s in out.scheduled:  # the runner writes the new tokens' KV...
            req, end = s.request, s.start + s.num_new_tokens
            assert s.num_new_tokens > 0 and len(req.block_ids) * self.bs >= end
            assert s.sample == (end == req.num_tokens)
            for pos in range(s.start, end):
                block = self.kv.setdefault(req.block_ids[pos // self.bs], [None] * self.bs)
                block[pos % self.bs] = req.all_token_ids[pos]
        sampled = {}
        for s in out.scheduled:  # ...then attends over the whole context through the block table
            req, end = s.request, s.start + s.num_new_tokens
            context = [self.kv[req.block_ids[p // self.bs]][p % self.bs] for p in range(end)]
            assert context == req.all_token_ids[:end]
            if s.sample:
                sampled[req.request_id] = fake_model(context)
        return sched.update_from_output(out, sampled, now=float(len(self.steps)))

    def run(self, arrivals: dict[int, list[Request]], max_steps: int = 20_000) -> None:
        step = 0
        while self.sched.has_unfinished_requests() or any(s >= step for s in arrivals):
            for req in arrivals.get(step, []):
                self.sched.add_request(req)
            self.step()
            step += 1
            assert step < max_steps, "no progress"


def make_request(rid: str, prompt: list[int], max_tokens: int, eos: tuple[int, ...] = ()) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), eos_token_ids=eos)


def assert_all_blocks_free(sched: Scheduler) -> None:
    pool = sched.kv.pool
    assert sched.kv_cache_usage == 0.0 and pool.ref_cnt == [0] * pool.num_blocks
    assert pool.get_num_free_blocks() == pool.num_blocks


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(1, 8))
    # Small alphabet and a common stem: shared prefixes and identical prompts are common.
    stem = draw(st.lists(st.integers(0, 3), max_size=32))
    reqs = []
    for i in range(n):
        prompt = stem[:draw(st.integers(0, len(stem)))] + draw(st.lists(st.integers(0, 3), max_size=12))
        reqs.append((prompt or [0], draw(st.integers(1, 12)), draw(st.integers(0, 6))))
    longest = max(len(p) + m for p, m, _ in reqs)
    num_blocks = -(-longest // block_size) + draw(st.integers(0, 6))  # every request fits alone
    return dict(block_size=block_size, num_blocks=num_blocks, reqs=reqs,
                budget=draw(st.integers(1, 48)), max_num_seqs=draw(st.integers(1, 6)),
                caching=draw(st.booleans()), eos=draw(st.sampled_from([(), (45,), (100, 200, 300)])))


@settings(max_examples=500, deadline=None)
@given(workloads())
def test_every_request_finishes_with_reference_outputs(w):
    sched = Scheduler(w["budget"], w["max_num_seqs"], w["block_size"], w["num_blocks"],
                      enable_prefix_caching=w["caching"])
    arrivals, expected = {}, {}
    for i, (prompt, max_tokens, arrival) in enumerate(w["reqs"]):
        arrivals.setdefault(arrival, []).append(make_request(f"r{i}", prompt, max_tokens, w["eos"]))
        expected[f"r{i}"] = reference_outputs(prompt, max_tokens, w["eos"])
    runner = FakeRunner(sched)
    runner.run(arrivals)
    got = {r.request_id: r.output_token_ids for rs in arrivals.values() for r in rs}
    assert got == expected
    assert all(r.is_finished for rs in arrivals.values() for r in rs)
    assert_all_blocks_free(sched)
    finished = [rid for out in runner.steps + [sched.schedule()] for rid in out.finished_req_ids]
    assert sorted(finished) == sorted(expected)  # each reported once to the runner
    assert 0 <= sched.prefix_cache_hits <= sched.prefix_cache_queries
    # Coverage of the interesting paths, shown by --hypothesis-show-statistics.
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"prefix hit: {sched.prefix_cache_hits > 0}")
    event(f"chunked: {any(not s.sample for out in runner.steps for s in out.scheduled)}")


def test_tiny_cache_preempts_and_outputs_still_match():
    sched = Scheduler(64, 4, block_size=4, num_blocks=8)  # 32 slots: one 10 + 20 request fits, two do not
    prompts = [[i, i + 1, 2, 3, 4, 5, 6, 7, 8, 9] for i in range(4)]
    reqs = [make_request(f"r{i}", p, 20) for i, p in enumerate(prompts)]
    runner = FakeRunner(sched)
    runner.run({0: reqs})
    assert sched.num_preemptions > 0
    assert any(out.preempted_req_ids for out in runner.steps)
    assert any(r.num_preemptions for r in reqs)
    for r, p in zip(reqs, prompts):
        assert r.output_token_ids == reference_outputs(p, 20)
        assert r.status == RequestStatus.FINISHED_LENGTH
    assert_all_blocks_free(sched)


def test_tiny_budget_chunks_the_prompt():
    sched = Scheduler(16, 4, block_size=4, num_blocks=64)
    prompt = list(range(50))
    req = make_request("a", prompt, 3)
    runner = FakeRunner(sched)
    runner.run({0: [req]})
    chunks = [(s.start, s.num_new_tokens, s.sample) for out in runner.steps for s in out.scheduled]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True), (50, 1, True), (51, 1, True)]
    assert req.output_token_ids == reference_outputs(prompt, 3)


def test_decodes_go_first_and_a_new_prompt_takes_what_is_left():
    sched = Scheduler(10, 4, block_size=4, num_blocks=64)
    a, b = make_request("a", [1, 2, 3], 5), make_request("b", list(range(20)), 2)
    runner = FakeRunner(sched)
    runner.run({0: [a], 1: [b]})
    second = [(s.request.request_id, s.start, s.num_new_tokens) for s in runner.steps[1].scheduled]
    assert second == [("a", 3, 1), ("b", 0, 9)]
    assert b.output_token_ids == reference_outputs(list(range(20)), 2)


def test_shared_prefixes_are_hit_and_counted():
    sched = Scheduler(256, 4, block_size=4, num_blocks=64)
    stem = list(range(100, 112))  # 3 full blocks
    a, b = make_request("a", stem + [1, 2], 4), make_request("b", stem + [7], 4)
    runner = FakeRunner(sched)
    runner.run({0: [a], 10: [b]})
    assert b.num_cached_tokens == 12
    first_b = next(s for out in runner.steps for s in out.scheduled if s.request is b)
    assert (first_b.start, first_b.num_new_tokens) == (12, 1)
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (14 + 13, 12)
    assert b.output_token_ids == reference_outputs(stem + [7], 4)


@pytest.mark.parametrize("prompt_len, expected_start", [(8, 4), (9, 8), (3, 0)])
def test_whole_prompt_in_cache_still_computes_the_last_token(prompt_len, expected_start):
    sched = Scheduler(256, 4, block_size=4, num_blocks=64)
    prompt = list(range(prompt_len))
    runner = FakeRunner(sched)
    runner.run({0: [make_request("a", prompt, 1)]})
    twin = make_request("b", prompt, 2)
    runner.run({0: [twin]})
    first = runner.steps[-2].scheduled[0]
    assert (first.start, first.num_new_tokens, first.sample) == (expected_start, prompt_len - expected_start, True)
    assert twin.output_token_ids == reference_outputs(prompt, 2)


def test_identical_prompts_in_one_step_share_only_computed_blocks():
    """n > 1 samples: the siblings wait one step for the first one's prompt blocks, then hit them."""
    sched = Scheduler(256, 4, block_size=4, num_blocks=64)
    prompt = list(range(13))
    samples = [make_request(f"n{i}", prompt, 5) for i in range(3)]
    runner = FakeRunner(sched)
    runner.run({0: samples})
    first_two = [[(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled] for out in runner.steps[:2]]
    assert first_two == [[("n0", 0, 13)], [("n0", 13, 1), ("n1", 12, 1), ("n2", 12, 1)]]
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (39, 24)
    assert all(r.output_token_ids == reference_outputs(prompt, 5) for r in samples)
    assert_all_blocks_free(sched)


def test_a_deferred_request_keeps_its_place_and_others_go_ahead():
    sched = Scheduler(256, 2, block_size=4, num_blocks=64)  # 2 seqs: d does not fit this step
    a, b = make_request("a", [1] * 9, 3), make_request("b", [1] * 9, 3)
    c, d = make_request("c", [2] * 5, 3), make_request("d", [3] * 5, 3)
    runner = FakeRunner(sched)
    for r in (a, b, c, d):
        sched.add_request(r)
    runner.step()
    assert [s.request.request_id for s in runner.steps[0].scheduled] == ["a", "c"]
    assert list(sched.waiting) == [b, d]
    runner.run({})
    assert b.num_cached_tokens == 8 and b.output_token_ids == reference_outputs([1] * 9, 3)


def test_abort_frees_blocks_at_once_in_every_state():
    sched = Scheduler(64, 4, block_size=4, num_blocks=8)
    reqs = [make_request(f"r{i}", [i] * 6, 12) for i in range(3)]  # 2 blocks each at first, 5 at the end
    runner = FakeRunner(sched)
    for r in reqs:
        sched.add_request(r)
    for _ in range(20):
        runner.step()
        if any(r.status == RequestStatus.PREEMPTED for r in reqs):
            break
    states = {r.status for r in reqs}
    assert RequestStatus.RUNNING in states and RequestStatus.PREEMPTED in states
    out = sched.schedule()  # abort while a step is in flight: its results are ignored
    aborted = sched.abort_requests([r.request_id for r in reqs] + ["unknown"])
    assert [r.request_id for r in aborted] == [r.request_id for r in reqs]
    assert all(r.status == RequestStatus.FINISHED_ABORTED and r.block_ids == [] for r in reqs)
    assert_all_blocks_free(sched)
    assert sched.update_from_output(out, {s.request.request_id: 5 for s in out.scheduled}, 0.0) == []
    assert sched.num_running == sched.num_waiting == 0 and not sched.has_unfinished_requests()
    assert sorted(sched.schedule().finished_req_ids) == ["r0", "r1", "r2"]
    assert sched.schedule().finished_req_ids == []
    assert sched.abort_requests(["r0"]) == []


def test_finish_request_for_a_stop_string():
    sched = Scheduler(64, 4, block_size=4, num_blocks=16)
    a, b = make_request("a", [1, 2, 3], 50), make_request("b", [4, 5], 50)
    runner = FakeRunner(sched)
    for r in (a, b):
        sched.add_request(r)
    runner.step()
    runner.step()
    assert sched.finish_request("a", RequestStatus.FINISHED_STOPPED) is a
    assert a.finish_reason == "stop" and a.block_ids == [] and sched.running == [b]
    out = sched.schedule()
    assert out.finished_req_ids == ["a"] and [s.request for s in out.scheduled] == [b]


def test_eos_and_stats():
    sched = Scheduler(64, 1, block_size=4, num_blocks=16)
    prompt = [1, 2, 3]
    ref = reference_outputs(prompt, 10)
    a = make_request("a", prompt, 10, eos=(ref[2],))
    b = make_request("b", [9, 9], 3)
    runner = FakeRunner(sched)
    for r in (a, b):
        sched.add_request(r)
    runner.step()
    assert (sched.num_running, sched.num_waiting) == (1, 1)  # max_num_seqs = 1
    assert sched.kv_cache_usage == 1 / 16
    runner.run({})
    assert a.output_token_ids == ref[:3] and a.status == RequestStatus.FINISHED_STOPPED
    assert b.output_token_ids == reference_outputs([9, 9], 3)
    reqs_per_step = [len(out.scheduled) for out in runner.steps]
    assert max(reqs_per_step) == 1  # max_num_seqs holds b back until a finishes


def test_prompt_logprobs_requests_compute_the_whole_prompt():
    sched = Scheduler(256, 4, block_size=4, num_blocks=64)
    prompt = list(range(13))
    runner = FakeRunner(sched)
    runner.run({0: [make_request("a", prompt, 2)]})
    b = Request("b", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1))
    c = make_request("c", prompt, 2)
    runner.run({0: [b], 1: [c]})
    assert (b.num_cached_tokens, c.num_cached_tokens) == (0, 12)
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (26, 12)  # b is not a lookup
    assert b.output_token_ids == c.output_token_ids == reference_outputs(prompt, 2)


def test_blocks_of_a_partly_prefilled_prompt_are_shared_at_once():
    sched = Scheduler(24, 4, block_size=4, num_blocks=64)
    prompt = list(range(40))
    a = make_request("a", prompt, 2)
    b = make_request("b", prompt[:24] + [7] * 7, 2)  # shares what a computes in step 0 only
    c = make_request("c", prompt[:30] + [7], 2)  # also shares blocks a computes in step 1
    runner = FakeRunner(sched)
    runner.run({0: [a], 1: [b, c]})
    steps = [[(s.request.request_id, s.start, s.num_new_tokens) for s in out.scheduled] for out in runner.steps[1:3]]
    assert steps[0] == [("a", 24, 16), ("b", 24, 7)]  # b hits the 6 blocks a computed in step 0; c waits
    assert steps[1][:2] == [("a", 40, 1), ("b", 31, 1)] and steps[1][2] == ("c", 28, 3)
    assert b.output_token_ids == reference_outputs(prompt[:24] + [7] * 7, 2)
    assert c.output_token_ids == reference_outputs(prompt[:30] + [7], 2)
