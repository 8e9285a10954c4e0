"""Per-request sampling parameters on the device, the host's side: which slot of the device's
parameter table holds which request's record.

GpuSampler keeps a table of records on the device (sampling.cu's RowParams: temperature, top-k,
top-p, min-p, penalties, seed, logprobs), one per slot of S = max_num_seqs, kept across calls. A
call sends each row's slot and only the records of rows whose request is new to its slot or whose
parameters changed; the kernels read the other rows' records from the table. In the steady state
(the same requests as the last call) the host packs no record and looks nothing up.

Slots are keyed by request id (SamplingMetadata.request_ids) and remember the SamplingParams that
filled them (SamplingMetadata.sampling_params): a row whose params are neither that object nor
equal to it sends its record again. A request without a slot takes a free one or evicts the least
recently used slot not used by this call (keyed_slots.KeyedSlots). Rows without an id or params,
and every row of a call with more rows than slots, get slot -1: their records come fresh and the
table is not touched. The runner releases finished requests' slots (an optimization: eviction
alone is correct).

Pure Python: the device's side is sampling.cu's load_row, and gpu_sampler_inputs.resolve_rows is
its NumPy counterpart, which the CPU tests replay.
"""
from __future__ import annotations

from collections.abc import Hashable

from rvllm.keyed_slots import KeyedSlots
from rvllm.sampling.metadata import SamplingMetadata

NO_SLOT = -1


class ParamSlots:
    def __init__(self, num_slots: int):
        self._keys = KeyedSlots(num_slots, "parameter slots")
        self.num_slots = num_slots
        self.clear()

    def clear(self) -> None:
        """Forget every slot: each row's next call sends its record again (planned records never
        reached the device, or another vocabulary changed what a record holds)."""
        self._keys.clear()
        self._params: list = [None] * self.num_slots  # the SamplingParams each slot's record came from
        self._last: tuple | None = None  # (request ids, params, slots) of the last call

    def slot_of(self, key: Hashable) -> int | None:
        return self._keys.slot_of(key)

    def plan(self, meta: SamplingMetadata) -> tuple[list[int], list[int]]:
        """(each row's slot, the rows whose records this call sends, in row order)."""
        n, ids, params = meta.num_rows, meta.request_ids, meta.sampling_params
        last = self._last
        # The steady state: the same requests in the same rows with the same params as the last
        # call, which had slots (list == runs in C, identity first).
        if last is not None and ids is not None and params is not None and last[0] == ids and last[1] == params:
            return last[2], []
        # `all(params)`: truthiness, not `None in params`, which would call SamplingParams.__eq__ per row.
        if ids is None or params is None or n > self.num_slots or None in ids or not all(params):
            return [NO_SLOT] * n, list(range(n))
        if len(set(ids)) < n:
            raise ValueError("a request id appears in two rows of one sampling call")
        slots, new = self._keys.place(ids)
        filled = self._params
        for i in new:
            filled[slots[i]] = None  # an evicted request's params: not this row's record
        fresh = []
        for i, (slot, sp) in enumerate(zip(slots, params)):
            had = filled[slot]
            if not (had is sp or had == sp):
                fresh.append(i)
            filled[slot] = sp
        self._last = (list(ids), list(params), slots)
        return slots, fresh

    def release(self, keys) -> None:
        """Frees the slots of these keys (finished requests); unknown keys are ignored."""
        for slot in self._keys.release(keys):
            self._params[slot] = None
        self._last = None
