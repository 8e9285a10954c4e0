"""The GPU sampler's per-request penalty state, host side (rvllm/sampling/penalty_slots.py), with
NumPy arrays standing in for the device's (tests/test_sampler_gpu.py's DeviceState and emulate:
the kernels' slot updates, dense reads and sampled-token counts, fed by pack_step's buffer).

After any sequence of calls the device's counts must equal the bincount of each request's real
output and seen its prompt's and output's set: with async-style placeholders (tokens the device sampled
and counted, not yet known on the host), requests that skip calls (preemption), eviction when slots
run out, released and reused ids, and rows without ids."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rvllm.sampling.penalty_slots import PLACEHOLDER, PenaltySlots
from rvllm.sampling.sampler import Sampler
from rvllm.sampling_params import SamplingParams
from tests.test_sampler import meta_for
from tests.test_sampler_gpu import DeviceState, emulate

PEN = SamplingParams(temperature=0.0, frequency_penalty=0.5)


def plan(slots, ids, prompts, outputs, sampling=True, params=None):
    meta = meta_for(params or [PEN] * len(ids), prompts, outputs)
    meta.request_ids = ids
    return slots.plan(meta, sampling)


def test_a_known_request_uploads_only_what_the_device_has_not_counted():
    slots = PenaltySlots(4)
    p = [1, 2]
    u = plan(slots, ["a"], [p], [[5, 6]])[0]
    assert u.reset and list(u.prompt) == p and list(u.new_tokens) == [5, 6]
    u = plan(slots, ["a"], [p], [[5, 6, PLACEHOLDER]])[0]  # its token of the last call: counted there
    assert not u.reset and list(u.prompt) == [] and list(u.new_tokens) == []
    u = plan(slots, ["a"], [p], [[5, 6, 9, 4, 8]], sampling=False)[0]  # 9, 4 sampled on the device, 8 not
    assert not u.reset and list(u.new_tokens) == [8] and slots.counted[u.slot] == 5


def test_rows_without_a_penalty_get_no_slot():
    slots = PenaltySlots(1)
    updates = plan(slots, ["a", "b"], [[1], [1]], [[], []], params=[SamplingParams(), PEN])
    assert updates[0] is None and updates[1].slot == 0 and slots.slot_of("a") is None


def test_eviction_takes_the_least_recently_used_slot_never_one_of_this_call():
    slots = PenaltySlots(2)
    pa, pb, pc = [1], [2], [3]
    plan(slots, ["a", "b"], [pa, pb], [[], []])
    plan(slots, ["a"], [pa], [[7]])  # b is now the least recently used
    ua, uc = plan(slots, ["a", "c"], [pa, pc], [[7, 8], []])
    assert not ua.reset and uc.reset and slots.slot_of("b") is None and uc.slot != ua.slot
    ub, uc = plan(slots, ["b", "c"], [pb, pc], [[4], [5]])  # b comes back (a preempted request): full upload
    assert ub.reset and list(ub.new_tokens) == [4] and not uc.reset and slots.slot_of("a") is None


def test_release_frees_the_slot_and_a_reused_id_starts_over():
    slots = PenaltySlots(2)
    plan(slots, ["a"], [[1]], [[3, 4]])
    slots.release(["a", "unknown"])
    assert slots.slot_of("a") is None
    u = plan(slots, ["a"], [[9]], [[]])[0]
    assert u.reset and list(u.prompt) == [9]
    # Not released: another prompt list under the same id (a new request) or an output shorter than
    # what the device counted starts the slot over too.
    again = plan(slots, ["a"], [[9]], [[]])[0]
    assert again.reset and again.slot == u.slot
    p = [9]
    plan(slots, ["a"], [p], [[1, 2, 3]])
    assert plan(slots, ["a"], [p], [[1]])[0].reset


def test_rows_without_an_id_hold_a_slot_for_one_call():
    slots = PenaltySlots(3)
    pa = [2]
    ua = plan(slots, ["a"], [pa], [[4]])[0]
    u1, u2 = plan(slots, [None, None], [[1], [2]], [[3], [4]])
    assert u1.reset and u2.reset and len({ua.slot, u1.slot, u2.slot}) == 3
    u3, _ = plan(slots, [None, "b"], [[1], [5]], [[3], []])  # the anonymous slots were given back
    assert u3.reset and not plan(slots, ["a"], [pa], [[4, 0]])[0].reset  # so "a" was not evicted


def test_misuse_is_refused():
    slots = PenaltySlots(2)
    with pytest.raises(ValueError, match="two rows"):
        plan(slots, ["a", "a"], [[1], [1]], [[], []])
    with pytest.raises(ValueError, match="penalty slots"):
        plan(slots, ["a", "b", "c"], [[1]] * 3, [[]] * 3)
    with pytest.raises(RuntimeError, match="placeholder"):  # a new slot cannot know a token in flight
        plan(slots, ["a"], [[1]], [[5, PLACEHOLDER]])
    with pytest.raises(ValueError):
        PenaltySlots(0)


@settings(max_examples=200, deadline=None)
@given(num_slots=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
       calls=st.lists(st.booleans(), min_size=1, max_size=14))
def test_device_state_follows_the_real_outputs(num_slots, seed, calls):
    """calls: per call, whether the previous call's tokens are still placeholders (async scheduling);
    everything else (finishes, releases, reused ids, which rows run, rows without ids) from `seed`."""
    vocab = 12
    rng = np.random.default_rng(seed)
    state = DeviceState(vocab, num_slots)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0, presence_penalty=-1.0), SamplingParams(temperature=0.0)]
    reqs: dict = {}  # id -> [params, prompt (the request's own list), real output]
    last: set = set()  # ids sampled by the previous call
    for call, async_ in enumerate(calls):
        for rid in list(reqs):  # finish some: released by the runner, or left to eviction
            if rng.random() < 0.15:
                del reqs[rid]
                last.discard(rid)
                if rng.random() < 0.5:
                    state.slots.release([rid])
        free_ids = [f"r{k}" for k in range(7) if f"r{k}" not in reqs]  # finished ids come back: reused
        for rid in rng.choice(free_ids, max(0, 5 - len(reqs)), replace=False):
            reqs[str(rid)] = [params[rng.integers(3)], rng.integers(-1, vocab + 1, rng.integers(0, 6)).tolist(), []]
        penalized = {r for r in reqs if reqs[r][0] is not params[2]}
        chosen = [r for r in sorted(reqs) if rng.random() < 0.7]  # the others skip the call (preempted)
        rows = [r for r in chosen if r not in penalized] + [r for r in chosen if r in penalized][:num_slots]
        sps, prompts, real = [reqs[r][0] for r in rows], [reqs[r][1] for r in rows], [reqs[r][2] for r in rows]
        # The engine's lists: the previous call's token may still be a placeholder (the device has it).
        shown = [out[:-1] + [PLACEHOLDER] if async_ and r in last else list(out) for r, out in zip(rows, real)]
        ids = list(rows)
        if len(penalized & set(rows)) < num_slots and rng.random() < 0.3:  # a penalized row without an id
            sps.append(params[0])
            prompts.append(rng.integers(0, vocab, 3).tolist())
            real.append(rng.integers(0, vocab, rng.integers(0, 4)).tolist())
            shown.append(list(real[-1]))
            ids.append(None)
        last = set(rows)
        if not ids:
            continue
        meta = meta_for(sps, prompts, shown)
        meta.request_ids = ids
        logits = rng.normal(0, 1, size=(len(ids), vocab)).astype(np.float32)
        x, tokens, _, _ = emulate(logits, meta, step=call, state=state)
        np.testing.assert_array_equal(x, Sampler.process_logits(logits, meta_for(sps, prompts, real)))
        for r, tok in zip(rows, tokens):
            reqs[r][2].append(tok)
            if r not in penalized:  # (a finished request's slot may linger under its reused id: unused)
                continue
            slot = state.slots.slot_of(r)
            np.testing.assert_array_equal(state.counts[slot], np.bincount(reqs[r][2], minlength=vocab))
            np.testing.assert_array_equal(state.seen[slot], np.isin(np.arange(vocab), reqs[r][1] + reqs[r][2]))


def test_placeholder_is_the_engines():
    """penalty_slots keeps its own copy of the engine's placeholder id (sampling sits below the
    engine, so it cannot import it): the two must agree, or placeholders would be uploaded as tokens."""
    from rvllm.engine.request import PLACEHOLDER as ENGINE_PLACEHOLDER

    assert PLACEHOLDER == ENGINE_PLACEHOLDER


# ---- the steady-state fast path --------------------------------------------------------------------

def updates_of(updates):
    return [None if u is None else (u.slot, u.reset, list(u.prompt), list(u.new_tokens)) for u in updates]


def test_steady_calls_reuse_one_plan_and_upload_nothing():
    slots = PenaltySlots(4)
    pa, pb = [1, 2], [3]
    first = plan(slots, ["a", "b"], [pa, pb], [[5], [6, 7]])
    sa, sb = first[0].slot, first[1].slot
    steady = plan(slots, ["a", "b"], [pa, pb], [[5, PLACEHOLDER], [6, 7, PLACEHOLDER]])
    assert updates_of(steady) == [(sa, False, [], []), (sb, False, [], [])]
    again = plan(slots, ["a", "b"], [pa, pb], [[5, 9, PLACEHOLDER], [6, 7, 9, PLACEHOLDER]], sampling=False)
    assert again is steady and slots.counted[sa] == 3 and slots.counted[sb] == 4
    # Not steady: an output longer than counted (the last call did not sample), a new prompt list.
    assert updates_of(plan(slots, ["a", "b"], [pa, pb], [[5, 9, 4, 1], [6, 7, 9, 4]])) == [
        (sa, False, [], [1]), (sb, False, [], [])]
    assert updates_of(plan(slots, ["a", "b"], [list(pa), pb], [[5, 9, 4, 1, 0], [6, 7, 9, 4, 0]])) == [
        (sa, True, pa, [5, 9, 4, 1, 0]), (sb, False, [], [])]


MOVES = ("again", "again", "process", "shuffle", "add", "drop", "back", "finish", "release", "reuse", "shrink",
         "plain", "anonymous")


def outcome(slots, meta, sampling):
    try:
        return updates_of(slots.plan(meta, sampling))
    except (ValueError, RuntimeError) as e:
        return type(e), str(e)


@settings(max_examples=300, deadline=None)
@given(num_slots=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), async_=st.booleans(),
       moves=st.lists(st.sampled_from(MOVES), min_size=1, max_size=24))
def test_the_fast_path_plans_what_the_row_loop_plans(num_slots, seed, async_, moves):
    """Two PenaltySlots over the same calls, one with the steady-state fast path and one that always
    runs the per-row loop: the same updates (slots included) and counts after every call. Each move
    changes the next call or not ("again"): rows reordered, requests added, preempted and back,
    finished (released or left to eviction), a running request's slot released, a new request under
    a used id with equal (not the same) lists, a shorter output, penalties off and on, a row without
    an id, a call that does not sample. async_: a row's token of the last call is a placeholder the device counted."""
    rng = np.random.default_rng(seed)
    fast, slow = PenaltySlots(num_slots), PenaltySlots(num_slots)
    slow._steady = lambda meta, sampling: None
    plain = SamplingParams(temperature=0.0)
    reqs: dict = {}  # id -> [params, prompt (the request's own list), real output]
    rows: list = []  # the ids of the next call's rows
    counted: set = set()  # ids whose newest token the last call sampled and counted on the device
    for call, move in enumerate(moves):
        pick = rows[rng.integers(len(rows))] if rows else None
        if move == "shuffle":
            rng.shuffle(rows)
        elif move == "add" and len(rows) < num_slots:
            rid = f"r{call}"
            reqs[rid] = [PEN, rng.integers(0, 9, rng.integers(0, 4)).tolist(), []]
            rows.insert(rng.integers(len(rows) + 1), rid)
        elif move == "drop" and pick:
            rows.remove(pick)  # preempted: its slot may be evicted while it waits
        elif move == "back" and len(rows) < num_slots and set(reqs) - set(rows):
            rows.append(sorted(set(reqs) - set(rows))[0])
        elif move == "finish" and pick:
            rows.remove(pick)
            del reqs[pick]
            if rng.random() < 0.5:
                fast.release([pick])
                slow.release([pick])
        elif move == "release" and pick:  # a running request loses its slot: its next row starts over
            fast.release([pick])
            slow.release([pick])
            counted.discard(pick)
        elif move in ("reuse", "shrink") and pick:
            sp, prompt, out = reqs[pick]
            reqs[pick] = [sp, list(prompt), list(out)] if move == "reuse" else [sp, prompt, out[:len(out) // 2]]
            counted.discard(pick)
        elif move == "plain" and pick:
            reqs[pick][0] = plain if reqs[pick][0] is PEN else PEN
        sampling = move != "process"
        ids = list(rows)
        sps, prompts = [reqs[r][0] for r in ids], [reqs[r][1] for r in ids]
        shown = [reqs[r][2][:-1] + [PLACEHOLDER] if async_ and r in counted else reqs[r][2] for r in ids]
        if move == "anonymous" and len(rows) < num_slots:
            ids, sps, prompts, shown = ids + [None], sps + [PEN], prompts + [[1]], shown + [[2, 3]]
        if not ids:
            continue
        meta = meta_for(sps, prompts, shown)
        meta.request_ids = ids
        assert outcome(fast, meta, sampling) == outcome(slow, meta, sampling), f"call {call} ({move})"
        if rng.random() < 0.5:  # reading the counts settles what the fast path deferred: not every call
            assert fast.counted == slow.counted
        counted = {r for r in rows if reqs[r][0] is PEN} if sampling else set()
        for r in rows if sampling else ():
            reqs[r][2].append(int(rng.integers(0, 9)))
    assert fast.counted == slow.counted
