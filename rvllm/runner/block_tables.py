"""Block tables kept on the device, one row per request slot, updated by diffs.

The attention kernels read a step's block tables as [r, w] rows in the step's request order. Packing
every block id of every scheduled request into each step's inputs costs the host r x w values a step
(256 requests of 4k tokens: 64k ids). Instead the runner keeps a persistent table [num_slots,
max_blocks] on the device (step_inputs.StepBuffers.slot_tables), one row per request slot, and a
step carries only each row's slot and the ids its slot does not hold yet. One kernel
(backend.update_block_tables) writes those into the persistent table and gathers the step's [r, w]
rows from it before the forward.

A request's block list only grows (kv_cache_manager extends it) until the request is freed or
preempted, when it gets a new list object. So a slot remembers the list it was filled from and how
many of its ids it holds: the same list -> send the new tail; another list -> send it whole.
Which request holds which slot is keyed_slots.KeyedSlots.

Pure Python on ints and lists (the runner's hot loop): collect() calls rows() once a step.
"""
from __future__ import annotations

from rvllm.keyed_slots import KeyedSlots


class BlockTableSlots:
    def __init__(self, num_slots: int):
        self._keys = KeyedSlots(num_slots, "block table slots")
        self.num_slots = num_slots
        self.forget_all()

    def forget_all(self) -> None:
        """The device table may not hold what this mirror says (a step failed between collect()
        and its upload): every request's next row is sent whole."""
        self._source: list = [None] * self.num_slots  # the block list each slot's row was filled from
        self._synced = [0] * self.num_slots  # how many ids of that list the row holds

    def rows(self, request_ids: list[str], block_lists: list[list[int]], col0: list[int], new_ids: list[int],
             diff_off: list[int]) -> list[int]:
        """The slots of a step's rows (one per request, in order). Per row, appends to col0 the first
        column to write and to diff_off where its ids end in new_ids, which it extends with the
        block ids the row's slot lacks (none when it is up to date). The list returned is read only."""
        if len(request_ids) > self.num_slots:
            raise RuntimeError(f"block tables: a step has more requests than the {self.num_slots} slots")
        slots, new = self._keys.place(request_ids)
        source, synced = self._source, self._synced
        for i in new:
            source[slots[i]] = None  # the evicted request's list, if any: the row is sent whole
        for slot, blocks in zip(slots, block_lists):
            start = synced[slot] if source[slot] is blocks else 0
            if len(blocks) < start:  # not a list that only grew: resend it (kv_cache_manager never does this)
                start = 0
            source[slot] = blocks
            col0.append(start)
            if len(blocks) > start:
                new_ids += blocks[start:]
                synced[slot] = len(blocks)
            diff_off.append(len(new_ids))
        return slots

    def release(self, request_ids) -> None:
        """Finished requests: their slots are free again (eviction would also reclaim them)."""
        for slot in self._keys.release(request_ids):
            self._source[slot], self._synced[slot] = None, 0
