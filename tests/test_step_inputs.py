"""Step packing (one flat int32 buffer per step) and CUDA-graph bucket choice, without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from rvllm.backend.cpu import CpuBackend
from rvllm.engine.request import Request
from rvllm.engine.scheduler import ScheduledRequest, SchedulerOutput
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


def _fields(data, lay):
    a = np.frombuffer(data, np.int32)
    n, r = lay.n, lay.r
    return dict(width=int(a[0]), ids=a[lay.ids: lay.ids + n].tolist(), positions=a[lay.positions: lay.positions + n].tolist(),
                slots=a[lay.slots: lay.slots + n].tolist(), qsl=a[lay.qsl: lay.qsl + r + 1].tolist(),
                seq_lens=a[lay.seq_lens: lay.seq_lens + r].tolist(), logits_idx=a[lay.logits_idx: lay.logits_idx + r].tolist(),
                tables=a[lay.tables: lay.tables + r * lay.w].reshape(r, lay.w).tolist())


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
    lay = StepLayout(n=5, r=3, w=7)
    assert (lay.ids, lay.positions, lay.slots, lay.qsl, lay.seq_lens, lay.logits_idx, lay.tables) == \
        (1, 6, 11, 16, 20, 23, 26)
    assert lay.size == 26 + 3 * 7
    # A bucket's offsets do not depend on the block table width (graphs capture views at fixed addresses).
    assert StepLayout(8, 8, 1).tables == StepLayout(8, 8, 512).tables


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
    buffers = StepBuffers(CpuBackend(), 0)
    r = _request("x", list(range(7)), [3, 8])
    data, lay = serialize(collect(_sched((r, 0, 7, True)), BS))
    buffers.upload(data)
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
