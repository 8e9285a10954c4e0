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

Pure Python on ints and lists (the runner's hot loop): collect() calls row() once per scheduled
request.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockTableSlots:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"block table slots: need at least one, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # request id -> slot, least recently used first
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._source: list = [None] * num_slots  # the block list each slot's row was filled from
        self._synced = [0] * num_slots  # how many ids of that list the row holds
        self._used = [0] * num_slots  # the step that last used each slot
        self._step = 0

    def forget_all(self) -> None:
        """The device table may not hold what this mirror says (a step failed between collect()
        and its upload): every request's next row is sent whole."""
        self._source = [None] * self.num_slots
        self._synced = [0] * self.num_slots

    def begin_step(self) -> None:
        """A new step: slots used from now on are not evicted until the next one."""
        self._step += 1

    def row(self, request_id: str, blocks: list[int], col0: list[int], ids: list[int]) -> int:
        """The slot of this request's row. Appends to col0 the first column to write and extends
        `ids` with the block ids the slot lacks (none when it is up to date)."""
        slot = self._slot_of.get(request_id)
        if slot is None:
            slot = self._take(request_id)
        else:
            self._slot_of.move_to_end(request_id)
        self._used[slot] = self._step
        start = self._synced[slot] if self._source[slot] is blocks else 0
        if len(blocks) < start:  # not a list that only grew: resend it (kv_cache_manager never does this)
            start = 0
        self._source[slot] = blocks
        col0.append(start)
        if len(blocks) > start:
            ids += blocks[start:]
            self._synced[slot] = len(blocks)
        return slot

    def release(self, request_ids) -> None:
        """Finished requests: their slots are free again (eviction would also reclaim them)."""
        for rid in request_ids:
            slot = self._slot_of.pop(rid, None)
            if slot is not None:
                self._forget(slot)
                self._free.append(slot)

    def _take(self, request_id: str) -> int:
        if self._free:
            slot = self._free.pop()
        else:  # evict the least recently used slot that this step has not used
            for rid, slot in self._slot_of.items():
                if self._used[slot] != self._step:
                    break
            else:
                raise RuntimeError(f"block tables: a step has more requests than the {self.num_slots} slots")
            del self._slot_of[rid]
            self._forget(slot)
        self._slot_of[request_id] = slot
        return slot

    def _forget(self, slot: int) -> None:
        self._source[slot], self._synced[slot] = None, 0
