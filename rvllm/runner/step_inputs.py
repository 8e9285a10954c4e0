"""A step's inputs as one flat int32 buffer: built from Python ints and lists, one copy to the device.

`collect` walks the SchedulerOutput once and gathers Python lists; `serialize` lays them out, padded
to a CUDA-graph bucket when asked, in one `array('i')`; `StepBuffers.load` puts that in a pinned
host buffer, copies it with one asynchronous host-to-device copy, and one kernel moves it into a
persistent device buffer (on the CPU backend the array itself is the "device" buffer), and the
AttentionMetadata arrays are views into it. Layout, in int32 elements, for n token rows, r request
rows and k new block ids:

    [0]                         w, the block tables' row stride (graph-replayed decode attention
                                reads it on the device: a fixed address for every bucket)
    ids        [n]              at 1
    positions  [n]              at 1 + n
    slots      [n]              at 1 + 2n        cache slot of each new token; -1 = padding row
    qsl        [r + 1]          at 1 + 3n        query_start_loc
    seq_lens   [r]              at 2 + 3n + r
    logits_idx [r]              at 2 + 3n + 2r   rows that sample, first; zeros after
    row_slots  [r]              at 2 + 3n + 3r   each row's block-table slot (block_tables.py); -1: padding
    col0       [r]              at 2 + 3n + 4r   the first column of the row's new ids
    diff_off   [r + 1]          at 2 + 3n + 5r   row i's new ids are new_ids[diff_off[i]:diff_off[i + 1]]
    new_ids    [k]              at 3 + 3n + 6r

The block tables themselves ([r, w], w = the most blocks a row's context needs) are not sent:
`StepBuffers.load` writes the new ids into the persistent per-slot table and gathers the step's
rows from it into `StepBuffers.step_tables`, on the device, before the forward; columns past a row's
context are zero.

Padding (a decode step padded to bucket B: n = r = B): padding rows have id 0, position 0 and slot
-1 (nothing written to the cache); padding request k owns the k-th padding row with seq_len 0 and
no table row, so attention sees no keys and writes zeros; their outputs are ignored.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np

from rvllm.backend.cpu import AttentionMetadata
from rvllm.runner.block_tables import BlockTableSlots


@dataclass(frozen=True)
class StepLayout:
    n: int  # token rows
    r: int  # request rows
    w: int  # block table width
    k: int = 0  # new block ids

    @property
    def ids(self) -> int:
        return 1

    @property
    def positions(self) -> int:
        return 1 + self.n

    @property
    def slots(self) -> int:
        return 1 + 2 * self.n

    @property
    def qsl(self) -> int:
        return 1 + 3 * self.n

    @property
    def seq_lens(self) -> int:
        return 2 + 3 * self.n + self.r

    @property
    def logits_idx(self) -> int:
        return 2 + 3 * self.n + 2 * self.r

    @property
    def row_slots(self) -> int:
        return 2 + 3 * self.n + 3 * self.r

    @property
    def col0(self) -> int:
        return 2 + 3 * self.n + 4 * self.r

    @property
    def diff_off(self) -> int:
        return 2 + 3 * self.n + 5 * self.r

    @property
    def new_ids(self) -> int:
        return 3 + 3 * self.n + 6 * self.r

    @property
    def size(self) -> int:
        return self.new_ids + self.k


@dataclass
class StepMetadata(AttentionMetadata):
    """AttentionMetadata plus, for graph-replayed decode steps, the preallocated decode-attention
    scratch (backend.decode_workspace): the backend then launches with shapes only."""

    decode_workspace: object = None


@dataclass
class StepBatch:
    """One step as Python lists, in the scheduler's request order."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    # Block tables as diffs of the per-slot table (block_tables.py): per row its slot and the first
    # column of its new ids; diff_off: CSR offsets into new_ids (starts with 0).
    row_slots: list[int] = field(default_factory=list)
    col0: list[int] = field(default_factory=list)
    diff_off: list[int] = field(default_factory=lambda: [0])
    new_ids: list[int] = field(default_factory=list)
    width: int = 1  # the most blocks a row's context needs
    max_seq_len: int = 0  # max(seq_lens): the longest context (graphs pick by it, attention reads it)
    logits_indices: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    sample_rows: list = field(default_factory=list)  # (params, prompt ids, output ids, eos ids) per sampled row
    prompt_logprob_rows: list = field(default_factory=list)  # (request, first row, first position, last position)
    # Every request has one new token and samples, and no prompt logprobs are due: a graph may run it.
    decode_only: bool = True
    num_placeholders: int = 0  # input ids packed as -1 - k: row k of the previous step's sampled ids

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


def collect(sched, block_size: int, prev_rows: dict[str, int] | None = None,
            table_slots: BlockTableSlots | None = None) -> StepBatch:
    """SchedulerOutput -> StepBatch. Marks prompt logprobs of the scheduled positions as sent.

    prev_rows: request id -> its row in the previous step's sampled ids. A placeholder token
    (async scheduling: sampled by that step, not known on the host yet) is packed as -1 - row; the
    runner replaces it on the device before the forward.
    table_slots: the runner's block-table slots (what the device's per-slot table holds); None: a
    fresh one, as for an empty table (tests)."""
    bs = block_size
    b = StepBatch()
    if table_slots is None:
        table_slots = BlockTableSlots(max(1, len(sched.scheduled)))
    # Locals, not b's attributes: this loop runs for every scheduled request every step.
    ids, positions, slots = b.input_ids, b.positions, b.slots
    req_ids, block_lists = [], []  # the block tables' rows, placed in their slots after the loop
    max_seq_len = 0
    query_lens, seq_lens = b.query_lens, b.seq_lens
    logits_indices, sample_ids, sample_rows = b.logits_indices, b.sample_ids, b.sample_rows
    decode_only, num_placeholders = True, 0
    num_rows = 0
    for sr in sched.scheduled:
        req, start, n = sr.request, sr.start, sr.num_new_tokens
        end = start + n
        blocks = req.block_ids
        if n == 1:
            tok = req.all_token_ids[start]
            if tok < 0:
                tok = -1 - prev_rows[req.request_id]
                num_placeholders += 1
            ids.append(tok)
            positions.append(start)
            slots.append(blocks[start // bs] * bs + start % bs)
        else:
            decode_only = False
            ids.extend(req.all_token_ids[start:end])
            if req.num_pending and end > req.num_tokens - req.num_pending:
                raise RuntimeError(f"request {req.request_id}: a multi-token step reaches a placeholder")
            positions.extend(range(start, end))
            p = start
            while p < end:  # one range per cache block
                off = p % bs
                k = min(bs - off, end - p)
                base = blocks[p // bs] * bs + off
                slots.extend(range(base, base + k))
                p += k
        query_lens.append(n)
        seq_lens.append(end)
        if end > max_seq_len:
            max_seq_len = end
        req_ids.append(req.request_id)
        block_lists.append(blocks)
        params = req.sampling_params
        if params.prompt_logprobs is not None and req.prompt_logprobs_done < min(end, req.num_prompt_tokens - 1):
            # Position p predicts prompt token p + 1; positions already sent (before a preemption) are skipped.
            first, last = max(start, req.prompt_logprobs_done), min(end, req.num_prompt_tokens - 1)
            b.prompt_logprob_rows.append((req, num_rows + first - start, first, last))
            req.prompt_logprobs_done = last
            decode_only = False
        num_rows += n
        if sr.sample:
            logits_indices.append(num_rows - 1)
            sample_ids.append(req.request_id)
            sample_rows.append((params, req.prompt_token_ids, req.output_token_ids, req.eos_token_ids))
        else:
            decode_only = False
    b.row_slots = table_slots.rows(req_ids, block_lists, b.col0, b.new_ids, b.diff_off)
    b.decode_only, b.num_placeholders = decode_only, num_placeholders
    b.max_seq_len, b.width = max_seq_len, max(1, -(-max_seq_len // bs))
    return b


def serialize(b: StepBatch, pad_tokens: int = 0, pad_reqs: int = 0) -> tuple[array, StepLayout]:
    """The step in the layout above, with at least pad_tokens token rows and pad_reqs request rows."""
    nt, nr = b.num_tokens, b.num_reqs
    n, r, w = max(nt, pad_tokens), max(nr, pad_reqs), b.width
    lay = StepLayout(n, r, w, len(b.new_ids))
    # One flat list of Python ints, converted once: list concatenation is a copy of pointers, and
    # struct.pack converts ints several times faster than array.extend (256 decode rows: ~4k values).
    flat = [w]
    flat += b.input_ids
    flat += [0] * (n - nt)
    flat += b.positions
    flat += [0] * (n - nt)
    flat += b.slots
    flat += [-1] * (n - nt)
    qsl = list(accumulate(b.query_lens, initial=0))
    flat += qsl
    flat += [min(n, qsl[-1] + k) for k in range(1, r - nr + 1)]  # padding request k owns padding row k
    flat += b.seq_lens
    flat += [0] * (r - nr)
    flat += b.logits_indices
    flat += [0] * (r - len(b.logits_indices))
    flat += b.row_slots
    flat += [-1] * (r - nr)  # padding requests: no table row
    flat += b.col0
    flat += [0] * (r - nr)
    flat += b.diff_off
    flat += [b.diff_off[-1]] * (r - nr)
    flat += b.new_ids
    assert len(flat) == lay.size, (len(flat), lay)
    return array("i", struct.pack(f"{len(flat)}i", *flat)), lay


class StepBuffers:
    """The persistent step-input buffers. On CUDA: the device buffer the forward and the CUDA graphs
    read (`device`, at a fixed address), and two pinned host buffers with two device buffers that a
    step's serialized inputs take turns in. A step's copy runs on the backend's upload stream as
    soon as the host has packed it (backend.upload_copy), so with async scheduling it travels
    while the step before still runs; one kernel on the current stream (backend.unpack_step_inputs)
    then fills `device` from it, placeholders and block tables included. On the CPU the serialized
    array is used in place. Also the block tables: the per-slot table (`slot_tables` [num_slots,
    max_width], mirrored on the host by `table_slots`) and the step's rows gathered from it
    (`step_tables`, at a fixed address for CUDA graphs)."""

    def __init__(self, backend, capacity: int, num_slots: int = 1, max_width: int = 1):
        """num_slots: requests a step has at most (max_num_seqs); max_width: blocks a request has
        at most (max_model_len / block_size)."""
        self.ops = backend
        self.on_device = backend.name != "cpu"
        self.capacity = 0
        self.device = None
        if self.on_device:
            self._allocate(capacity)
        self.table_slots = BlockTableSlots(num_slots)
        self.max_width = max_width
        self.slot_tables = backend.zeros((num_slots, max_width), np.int32)  # [S, W]
        self.step_tables = backend.zeros((num_slots * max_width,), np.int32)  # the step's [r, w], compact

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self.device = self.ops.zeros((capacity,), np.int32)
        # Two of each, in turns: a step's copy may run while the previous step's kernel reads its own.
        self._host = [self.ops.pinned_empty(capacity, np.int32) for _ in range(2)]
        self._staged = [self.ops.zeros((capacity,), np.int32) for _ in range(2)]
        self._copied = [None, None]  # event after the copy out of each pinned buffer
        self._read = [None, None]  # event after the kernel that last read each staged buffer
        self._turn = 0

    def fits(self, size: int) -> bool:
        return not self.on_device or size <= self.capacity

    def grow(self, size: int) -> None:
        """Reallocates the buffers (views made earlier, CUDA graphs included, go stale)."""
        self.ops.synchronize_device()  # the copies on the upload stream too
        self._allocate(max(size, 2 * self.capacity))

    def load(self, data: array, lay: StepLayout, block_size: int, prev_sampled=None, embed=None) -> None:
        """data (serialize's output, laid out as `lay`) -> the device buffer, asynchronously: its token
        ids packed as placeholders read from prev_sampled (the previous step's sampled ids on the
        device; None when the step has none), its block tables written into slot_tables and its
        [lay.r, lay.w] rows gathered into step_tables; with embed (table, out), the ids' embedding
        rows gathered into out too. Work queued next on the current stream sees it."""
        if lay.w > self.max_width or lay.r * lay.w > self.step_tables.shape[0]:
            raise ValueError(f"step inputs: block tables of {lay.r} rows x {lay.w} blocks exceed the "
                             f"{self.slot_tables.shape[0]} x {self.max_width} the runner holds")
        n = len(data)
        if not self.on_device:
            self.device = src = np.frombuffer(data, np.int32)
        else:
            if n > self.capacity:
                raise ValueError(f"step inputs: {n} int32 values exceed the buffer's {self.capacity}")
            i = self._turn
            self._turn ^= 1
            if self._copied[i] is not None:
                self._copied[i].synchronize()  # the copy two steps ago has read this pinned buffer
            self._host[i][:n] = np.frombuffer(data, np.int32)
            src = self._staged[i][:n]
            self._copied[i] = self.ops.upload_copy(src, self._host[i], n, reusable=self._read[i], event=self._copied[i])
        r = lay.r
        self.ops.unpack_step_inputs(
            self.device, src, lay.ids, lay.n, prev_sampled, self.step_tables[: r * lay.w].reshape(r, lay.w),
            self.slot_tables, src[lay.row_slots: lay.row_slots + r], src[lay.col0: lay.col0 + r],
            src[lay.diff_off: lay.diff_off + r + 1], src[lay.new_ids: lay.new_ids + lay.k],
            src[lay.seq_lens: lay.seq_lens + r], block_size, embed)
        if self.on_device:
            self._read[i] = self.ops.record_event(self._read[i])

    def views(self, lay: StepLayout, table_width: int | None = None):
        """(input_ids, positions, slot_mapping, query_start_loc, seq_lens, logits_idx, block_tables)
        views of the device buffers in layout `lay`; block_tables is [r, table_width or lay.w] of
        step_tables (load fills it)."""
        d = self.device
        n, r = lay.n, lay.r
        w = table_width or lay.w
        return (d[lay.ids: lay.ids + n], d[lay.positions: lay.positions + n], d[lay.slots: lay.slots + n],
                d[lay.qsl: lay.qsl + r + 1], d[lay.seq_lens: lay.seq_lens + r],
                d[lay.logits_idx: lay.logits_idx + r], self.step_tables[: r * w].reshape(r, w))

    @property
    def row_stride(self):
        """The device int32 [1] holding the block tables' row stride of the current step."""
        return self.device[0:1]
