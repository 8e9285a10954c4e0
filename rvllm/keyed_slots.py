"""Which slot of a fixed table of per-request state holds which request: the mechanism shared by
the block tables (runner/block_tables.py), the penalty state (sampling/penalty_slots.py) and the
parameter records (sampling/param_slots.py), each of which keeps its own per-slot data.

A call places one step's keys (request ids) at once: a key with a slot keeps it; a new key takes a
free slot (slot 0 first) or evicts the least recently used key not in the call. Placing the whole
call before any eviction is what keeps a later row's slot from being evicted by an earlier row's
new key. Recency is by call, then by row: a call leaves its keys the most recent, in row order, so
the same call again changes nothing (owners skip their steady-state calls on that). Owners release
finished keys (eviction alone would reclaim them, later).

Here, not in runner/ or sampling/: both use it, and runner/ sits above sampling/. Pure Python, no
imports from rvllm. place() runs once per step for up to max_num_seqs keys.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class KeyedSlots:
    def __init__(self, num_slots: int, what: str = "slots"):
        """what: the owner's name for its slots, for the error messages."""
        if num_slots < 1:
            raise ValueError(f"{what}: need at least one, got {num_slots}")
        self.num_slots = num_slots
        self.what = what
        self.clear()

    def clear(self) -> None:
        """Every key loses its slot."""
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._last: tuple[list, list[int]] | None = None  # (keys, slots) of the last place()

    def slot_of(self, key: Hashable) -> int | None:
        return self._slot_of.get(key)

    def place(self, keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
        """(each key's slot, the indices of the keys new to theirs), keys in the call's row order
        and distinct. The slot list may be the one the last call returned: read it, do not change it."""
        last = self._last
        if last is not None and keys == last[0]:  # list == runs in C, identity first
            # The same keys as the last call: the same slots, and nothing to reorder (that call
            # left them the most recent, in this order).
            return last[1], []
        if len(keys) > self.num_slots:
            raise ValueError(f"{self.what}: {len(keys)} keys in one call, {self.num_slots} slots")
        slot_of, free = self._slot_of, self._free
        pop = slot_of.pop
        slots = [pop(k, -1) for k in keys]  # the call's keys out of the order: the rest may be evicted
        new = [i for i, slot in enumerate(slots) if slot < 0] if -1 in slots else []
        for i in new:  # a free slot, else the least recently used key's
            slots[i] = free.pop() if free else slot_of.popitem(last=False)[1]
        slot_of.update(zip(keys, slots))  # back in as the most recent, in row order
        if len(slot_of) + len(free) != self.num_slots:  # a repeated key took two slots and kept one
            self.clear()
            raise ValueError(f"{self.what}: a key appears twice in one call")
        self._last = (list(keys), slots)
        return slots, new

    def release(self, keys) -> list[int]:
        """Frees the slots of these keys (finished requests) and returns them; unknown keys are
        ignored."""
        freed = []
        for k in keys:
            slot = self._slot_of.pop(k, None)
            if slot is not None:
                self._free.append(slot)
                freed.append(slot)
        if freed:
            self._last = None
        return freed
