"""The GPU sampler's parameter table, host side (rvllm/sampling/param_slots.py), and the rows the
kernels read through it (gpu_sampler_inputs.resolve_rows, sampling.cu load_row's NumPy
counterpart): a call sends only the records of rows new to their slots, and every row still reads
its own request's parameters."""
from __future__ import annotations

import numpy as np
import pytest

from rvllm.sampling.gpu_sampler_inputs import PARAMS_DTYPE, pack_step, resolve_rows
from rvllm.sampling.param_slots import NO_SLOT, ParamSlots
from rvllm.sampling_params import SamplingParams
from tests.test_sampler import meta_for
from tests.test_sampler_gpu import random_params, unpack


def meta_of(ids, params, outputs=None):
    meta = meta_for(params, outputs=outputs)
    meta.request_ids = list(ids)
    return meta


def test_a_call_sends_the_records_of_new_requests_only():
    slots = ParamSlots(3)
    a, b, c, d = (SamplingParams(temperature=t) for t in (0.5, 0.7, 0.9, 1.1))
    got, fresh = slots.plan(meta_of(["a", "b"], [a, b]))
    assert sorted(got) == [0, 1] and fresh == [0, 1]
    sa, sb = slots.slot_of("a"), slots.slot_of("b")
    assert slots.plan(meta_of(["a", "b"], [a, b])) == ([sa, sb], [])  # the steady state
    assert slots.plan(meta_of(["b", "a"], [b, a])) == ([sb, sa], [])  # rows move, records stay
    # Equal params in another object: nothing to send; other params: the record again.
    assert slots.plan(meta_of(["a", "b"], [SamplingParams(temperature=0.5), b])) == ([sa, sb], [])
    assert slots.plan(meta_of(["a", "b"], [a, SamplingParams(temperature=0.2)])) == ([sa, sb], [1])
    # A third request takes the free slot; a fourth evicts the least recently used one not in the call.
    got, fresh = slots.plan(meta_of(["c", "a"], [c, a]))
    assert fresh == [0] and got[1] == sa and len({sa, sb, got[0]}) == 3
    got, fresh = slots.plan(meta_of(["d", "c"], [d, c]))
    assert fresh == [0] and got[0] == sb and slots.slot_of("b") is None
    slots.release(["d", "unknown"])
    assert slots.slot_of("d") is None
    got, fresh = slots.plan(meta_of(["b"], [b]))
    assert got == [sb] and fresh == [0]  # the freed slot, its record sent again


def test_rows_without_a_slot_come_fresh_and_leave_the_table_alone():
    slots = ParamSlots(2)
    sp = SamplingParams()
    assert slots.plan(meta_for([sp, sp])) == ([NO_SLOT] * 2, [0, 1])  # no request ids
    assert slots.plan(meta_of(["a", None], [sp, sp])) == ([NO_SLOT] * 2, [0, 1])
    assert slots.plan(meta_of(["a", "b", "c"], [sp] * 3)) == ([NO_SLOT] * 3, [0, 1, 2])  # more rows than slots
    assert slots.slot_of("a") is None
    with pytest.raises(ValueError, match="two rows"):
        slots.plan(meta_of(["a", "a"], [sp, sp]))


def test_rows_read_their_own_parameters_over_many_calls():
    """Random calls over a pool of requests (rows in any order, new params for a request now and
    then, more requests than slots, finished requests released): each row's resolved record, read
    through the table, equals the one an all-fresh call gives."""
    rng = np.random.default_rng(5)
    vocab, pool, num_slots = 1000, 9, 4
    slots = ParamSlots(num_slots)
    table = np.frombuffer(rng.bytes(num_slots * PARAMS_DTYPE.itemsize), PARAMS_DTYPE).copy()  # garbage
    params = dict(zip(range(pool), random_params(rng, pool, vocab)))
    outputs = {r: [] for r in range(pool)}
    sent = total = 0
    for call in range(300):
        rows = [int(r) for r in rng.choice(pool, int(rng.integers(1, num_slots + 2)), replace=False)]
        if rng.random() < 0.1:
            r = rows[0]
            params[r] = random_params(rng, 1, vocab)[0]
        if rng.random() < 0.05:
            slots.release([f"r{int(rng.integers(pool))}"])
        meta = meta_of([f"r{r}" for r in rows], [params[r] for r in rows], [outputs[r] for r in rows])
        host, offsets = pack_step(meta, vocab, call, 7, None, slots.plan(meta))
        s = unpack(host, offsets, len(rows), vocab)
        sent += int((s["steps"]["fresh"] >= 0).sum())
        total += len(rows)
        got = resolve_rows(table, s["fresh"], s["steps"], call)
        host, offsets = pack_step(meta, vocab, call, 7)
        s = unpack(host, offsets, len(rows), vocab)
        want = resolve_rows(np.zeros(0, PARAMS_DTYPE), s["fresh"], s["steps"], call)
        assert got.tobytes() == want.tobytes(), f"call {call}"
        for r in rows:
            outputs[r] = outputs[r] + [1]
    assert 0.2 * total < total - sent < 0.8 * total, (sent, total)  # both paths well exercised
