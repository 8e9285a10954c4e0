"""Step packing (one flat int32 buffer per step) and CUDA-graph bucket choice, without a GPU."""
from __future__ import annotations

from array import array

import numpy as np
import pytest

from rvllm.backend.cpu import CpuBackend
from rvllm.engine.request import Request
from rvllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from rvllm.runner.block_tables import BlockTableSlots
from rvllm.runner.graphs import batch_size_buckets, choose_bucket
from rvllm.runner.step_inputs import StepBuffers, StepLayout, collect, serialize
from rvllm.sampling_params import SamplingParams

BS = 4


def _request(rid, tokens, blocks, prompt_logprobs=None, num_prompt=None):
    num_prompt = len(tokens) if num_prompt is None else num_prompt
    req = Request(rid, tokens[:num_prompt], SamplingParams(prompt_logprobs=prompt_logprobs))
    for t in tokens[num_prompt:]:
        req.append_output_token(t, 0.0)
    req.block_ids = list(blocks)
    return req


def _sched(*items):
    scheduled = [ScheduledRequest(req, start, n, sample) for req, start, n, sample in items]
    return SchedulerOutput(scheduled, sum(s.num_new_tokens for s in scheduled), [], [])


def _fields(data, lay, slot_tables=None):
    """The serialized step's fields; `tables` as update_block_tables makes them from slot_tables (a
    fresh, zero table when None), which it updates."""
    a = np.frombuffer(data, np.int32)
    n, r = lay.n, lay.r
    if slot_tables is None:
        slot_tables = np.zeros((max(r, 1), 64), np.int32)
    tables = np.full((r, lay.w), -5, np.int32)
    CpuBackend().update_block_tables(tables, slot_tables, a[lay.row_slots: lay.row_slots + r], a[lay.col0: lay.col0 + r],
                                     a[lay.diff_off: lay.diff_off + r + 1], a[lay.new_ids: lay.new_ids + lay.k],
                                     a[lay.seq_lens: lay.seq_lens + r], BS)
    return dict(width=int(a[0]), ids=a[lay.ids: lay.ids + n].tolist(), positions=a[lay.positions: lay.positions + n].tolist(),
                slots=a[lay.slots: lay.slots + n].tolist(), qsl=a[lay.qsl: lay.qsl + r + 1].tolist(),
                seq_lens=a[lay.seq_lens: lay.seq_lens + r].tolist(), logits_idx=a[lay.logits_idx: lay.logits_idx + r].tolist(),
                row_slots=a[lay.row_slots: lay.row_slots + r].tolist(), new_ids=a[lay.new_ids: lay.new_ids + lay.k].tolist(),
                tables=tables.tolist())


def test_buckets():
    assert batch_size_buckets(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert batch_size_buckets(2000) == [1, 2, 4] + list(range(8, 513, 8))  # capped at 512
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]  # max_num_seqs itself is the last bucket
    assert batch_size_buckets(5) == [1, 2, 4, 5]
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(8) == [1, 2, 4, 8]
    buckets = batch_size_buckets(256)
    assert [choose_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 17, 255, 256)] == [1, 2, 4, 8, 8, 16, 24, 256, 256]
    assert choose_bucket(buckets, 257) is None


def test_layout_offsets_are_contiguous_and_fixed_per_bucket():
    lay = StepLayout(n=5, r=3, w=7, k=4)
    assert (lay.ids, lay.positions, lay.slots, lay.qsl, lay.seq_lens, lay.logits_idx, lay.row_slots, lay.col0,
            lay.diff_off, lay.new_ids) == (1, 6, 11, 16, 20, 23, 26, 29, 32, 36)
    assert lay.size == 36 + 4
    # A bucket's offsets do not depend on the block table width or the new ids (graphs capture views
    # at fixed addresses).
    assert StepLayout(8, 8, 1).seq_lens == StepLayout(8, 8, 512, 99).seq_lens


def test_mixed_step_packing():
    """A chunked prefill (crossing blocks), a decode, and a prompt chunk that does not sample."""
    a = _request("a", list(range(100, 110)), [7, 3, 9])         # 10 prompt tokens, chunk 2..9 (8 tokens)
    b = _request("b", [1, 2, 3, 4, 5, 6], [5, 2], num_prompt=5)  # decode: token at position 5
    c = _request("c", [9] * 12, [1, 4, 6])                         # chunk 0..3 of a 12-token prompt
    batch = collect(_sched((a, 2, 8, True), (b, 5, 1, True), (c, 0, 4, False)), BS)
    assert not batch.decode_only
    data, lay = serialize(batch)
    assert (lay.n, lay.r, lay.w) == (13, 3, 3)
    f = _fields(data, lay)
    assert f["width"] == 3
    assert f["ids"] == list(range(102, 110)) + [6] + [9] * 4
    assert f["positions"] == list(range(2, 10)) + [5] + [0, 1, 2, 3]
    slot = lambda blocks, p: blocks[p // BS] * BS + p % BS  # noqa: E731
    assert f["slots"] == [slot([7, 3, 9], p) for p in range(2, 10)] + [slot([5, 2], 5)] + [slot([1, 4, 6], p) for p in range(4)]
    assert f["qsl"] == [0, 8, 9, 13]
    assert f["seq_lens"] == [10, 6, 4]
    assert f["logits_idx"] == [7, 8, 0]  # the sampled rows first, zero after
    assert f["tables"] == [[7, 3, 9], [5, 2, 0], [1, 0, 0]]
    assert f["new_ids"] == [7, 3, 9, 5, 2, 1, 4, 6]  # every request's whole list: the slots were empty
    assert batch.sample_ids == ["a", "b"]


def test_decode_step_padded_to_bucket():
    reqs = [_request(str(i), list(range(10 + i)), [i, 10 + i, 20 + i], num_prompt=5) for i in range(3)]
    batch = collect(_sched(*[(r, r.num_tokens - 1, 1, True) for r in reqs]), BS)
    assert batch.decode_only
    data, lay = serialize(batch, 4, 4)
    assert (lay.n, lay.r) == (4, 4)
    f = _fields(data, lay)
    assert f["ids"] == [9, 10, 11, 0]
    assert f["positions"] == [9, 10, 11, 0]
    assert f["slots"] == [20 * BS + 1, 21 * BS + 2, 22 * BS + 3, -1]  # the padding row writes nothing
    assert f["qsl"] == [0, 1, 2, 3, 4]  # the padding request owns the padding row ...
    assert f["seq_lens"] == [10, 11, 12, 0]  # ... and sees no keys
    assert f["logits_idx"] == [0, 1, 2, 0]
    assert f["tables"] == [[0, 10, 20], [1, 11, 21], [2, 12, 22], [0, 0, 0]]


def test_padding_with_more_requests_than_rows():
    """Padding requests past the last padding row own no rows (query_start_loc stays at n)."""
    r = _request("x", [1, 2, 3], [4])
    data, lay = serialize(collect(_sched((r, 2, 1, True)), BS), 2, 4)
    f = _fields(data, lay)
    assert f["qsl"] == [0, 1, 2, 2, 2]
    assert f["seq_lens"] == [3, 0, 0, 0]


def test_not_decode_only():
    r = _request("x", [1, 2, 3, 4, 5], [4, 5], num_prompt=5)
    assert not collect(_sched((r, 3, 1, False)), BS).decode_only  # a one-token prompt chunk: nothing sampled
    p = _request("p", [1, 2, 3], [4], prompt_logprobs=2)
    p.prompt_logprobs_done = 1
    assert not collect(_sched((p, 1, 1, True)), BS).decode_only  # prompt logprobs due: needs the hidden states


def test_cpu_buffers_give_views():
    buffers = StepBuffers(CpuBackend(), 0, num_slots=4, max_width=8)
    r = _request("x", list(range(7)), [3, 8])
    data, lay = serialize(collect(_sched((r, 0, 7, True)), BS, table_slots=buffers.table_slots))
    buffers.load(data, lay, BS)
    ids, positions, slots, qsl, seq_lens, logits_idx, tables = buffers.views(lay)
    assert ids.tolist() == list(range(7)) and positions.tolist() == list(range(7))
    assert slots.tolist() == [12, 13, 14, 15, 32, 33, 34]
    assert qsl.tolist() == [0, 7] and seq_lens.tolist() == [7] and logits_idx.tolist() == [6]
    assert tables.shape == (1, 2) and tables.tolist() == [[3, 8]]
    assert ids.dtype == np.int32 and buffers.fits(10 ** 9)


@pytest.mark.parametrize("n", [1, 5, 16])
def test_serialize_sizes(n):
    reqs = [_request(str(i), list(range(3 + i)), range(10 * i, 10 * i + 6)) for i in range(n)]
    batch = collect(_sched(*[(r, r.num_tokens - 1, 1, True) for r in reqs]), BS)
    for pad in (0, n, n + 3):
        data, lay = serialize(batch, pad, pad)
        assert len(data) == lay.size and lay.n == max(n, pad) and lay.r == max(n, pad)


# ---- block tables by diffs (runner/block_tables.py) ------------------------------------------------

def step_rows(slots, rows):
    """One step's block-table rows, rows: (request id, block list) -> (slots, col0, new ids, diff_off)."""
    col0, ids, diff_off = [], [], [0]
    got = slots.rows([r for r, _ in rows], [b for _, b in rows], col0, ids, diff_off)
    return list(got), col0, ids, diff_off


def test_block_table_rows_send_only_what_the_slot_lacks():
    slots = BlockTableSlots(4)
    blocks = [7, 3]
    (s,), col0, ids, _ = step_rows(slots, [("a", blocks)])
    assert (col0, ids) == ([0], [7, 3])
    assert step_rows(slots, [("a", blocks)]) == ([s], [2], [], [0, 0])  # up to date: nothing
    blocks.append(11)  # the cache manager extends the same list
    assert step_rows(slots, [("a", blocks)]) == ([s], [2], [11], [0, 1])
    preempted = [4, 5, 6]  # freed and rescheduled: a new list, sent whole
    assert step_rows(slots, [("a", preempted)]) == ([s], [0], [4, 5, 6], [0, 3])
    slots.forget_all()  # after a failed step: everything again
    assert step_rows(slots, [("a", preempted)]) == ([s], [0], [4, 5, 6], [0, 3])
    # Rows of one step: each its own slot and diff.
    (s2, s1), col0, ids, diff_off = step_rows(slots, [("b", [1, 2]), ("a", preempted)])
    assert s1 == s and s2 != s and (col0, ids, diff_off) == ([0, 3], [1, 2], [0, 2, 2])


def test_block_table_slots_are_released_and_evicted_least_recently_used():
    slots = BlockTableSlots(2)
    (a, b), _, _, _ = step_rows(slots, [("a", [1]), ("b", [2])])
    assert {a, b} == {0, 1}
    slots.release(["a", "unknown"])
    assert step_rows(slots, [("c", [3])])[0::2] == ([a], [3])  # a's slot, free again
    step_rows(slots, [("c", [3])])
    assert step_rows(slots, [("d", [9, 8])])[0::2] == ([b], [9, 8])  # b was least recently used
    with pytest.raises(RuntimeError, match="more requests than the 2 slots"):
        step_rows(slots, [("c", [3]), ("d", [9, 8]), ("e", [1])])


def test_load_fills_placeholders_from_the_previous_sampled_ids():
    """Async scheduling's placeholders (-1 - k) become row k of the sampled ids passed; ids that are
    not placeholders, and every other field, stay as packed; without sampled ids nothing changes."""
    buffers = StepBuffers(CpuBackend(), 0, num_slots=4, max_width=8)
    a, b = _request("a", [1, 2, 3], [5]), _request("b", [4, 5, 6, 7], [6, 2])
    batch = collect(_sched((a, 2, 1, True), (b, 3, 1, True)), BS, table_slots=buffers.table_slots)
    data, lay = serialize(batch)
    packed = np.frombuffer(data, np.int32).copy()
    packed_ids = packed[lay.ids: lay.ids + lay.n].tolist()
    buffers.load(data, lay, BS, prev_sampled=None)
    assert buffers.views(lay)[0].tolist() == packed_ids
    placeholders = array("i", data)
    placeholders[lay.ids] = -2  # row 1 of the previous step's sampled ids
    buffers.table_slots.forget_all()
    buffers.load(placeholders, lay, BS, prev_sampled=np.array([40, 41], np.int32))
    assert buffers.views(lay)[0].tolist() == [41] + packed_ids[1:]
    rest = np.frombuffer(placeholders, np.int32)
    assert (rest[lay.positions:] == packed[lay.positions:]).all()
    assert buffers.views(lay)[-1].tolist() == [[5], [6]]


def test_tables_across_steps_match_the_block_lists():
    """Many steps of requests that grow, get preempted (a new list) and finish, through collect,
    serialize and the CPU update op on one persistent table: every step's rows are the lists."""
    rng = np.random.default_rng(0)
    buffers = StepBuffers(CpuBackend(), 0, num_slots=7, max_width=40)  # 6 requests and a padding row
    reqs = {}
    for step in range(300):
        if len(reqs) < 6 and rng.random() < 0.3:
            rid = f"r{step}"
            reqs[rid] = _request(rid, [1] * 40 * BS, rng.integers(0, 500, 1).tolist())
        if reqs and rng.random() < 0.05:
            gone = str(rng.choice(sorted(reqs)))
            del reqs[gone]
            buffers.table_slots.release([gone])
        for req in reqs.values():
            roll = rng.random()
            if roll < 0.3 and len(req.block_ids) < 39:
                req.block_ids.extend(rng.integers(0, 500, 1).tolist())
            elif roll < 0.33:
                req.block_ids = rng.integers(0, 500, rng.integers(1, 39)).tolist()  # preempted, resumed
        live = list(reqs.values())
        if not live:
            continue
        # One decode row per request at the end of its blocks (the context fills its last block).
        items = [(r, len(r.block_ids) * BS - 1, 1, True) for r in live]
        batch = collect(_sched(*items), BS, table_slots=buffers.table_slots)
        data, lay = serialize(batch, 0, len(live) + 1)  # a padding row too
        buffers.load(data, lay, BS)
        tables = buffers.views(lay)[-1]
        for i, r in enumerate(live):
            assert tables[i, : len(r.block_ids)].tolist() == r.block_ids
            assert not tables[i, len(r.block_ids):].any()
        assert not tables[len(live)].any()
