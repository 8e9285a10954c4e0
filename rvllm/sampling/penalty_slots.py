"""Per-request penalty state on the device, the host's side: which slot holds which request, and how
much of its output the device has counted.

GpuSampler keeps, per slot s of S (S = max_num_seqs), `counts[s, v]` (int32: how often token v
occurs in the request's output so far) and `in_prompt[s, v]` (uint8: 1 where v occurs in its
prompt); process_logits_kernel reads them densely for the repetition, frequency and presence
penalties. The device counts every token it samples for a row with a slot (sample_kernel), so the
host uploads only what the device has not seen: the prompt and the whole output when a request
gets a slot, nothing in the steady state. Under async scheduling the newest output token may be a
placeholder that only the device knows; it was counted when it was sampled, so it is never uploaded.

Slots are keyed by request id (SamplingMetadata.request_ids). A request without a slot takes a free
one or evicts the least recently used slot not used by this call; a request that comes back after
losing its slot (preempted, evicted) simply gets a new one and a full upload. The runner releases
finished requests' slots (an optimization: eviction alone is correct). Rows without an id get a
fresh key for one call. A slot starts over when its row brings another prompt list than the one it
was filled from (a new request under a reused id: the slot holds the request's own list, so `is`
tells) or an output shorter than what the device counted.

Pure Python: the device work is one SlotUpdate per row, which process_logits_kernel carries out
before it reads the slot; the CPU tests replay them on NumPy arrays.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from rvllm.sampling.metadata import SamplingMetadata

# engine/request.py's PLACEHOLDER: an output token sampled on the device, not known on the host yet.
PLACEHOLDER = -1
STATE_BYTES_PER_TOKEN = 4 + 1  # counts (int32) and in_prompt (uint8), per slot and vocabulary entry


def state_bytes(num_slots: int, vocab: int) -> int:
    """Device memory of the penalty state (GpuSampler allocates it on first use); the engine keeps
    it out of the KV cache's budget so that first use cannot run out of memory."""
    return num_slots * vocab * STATE_BYTES_PER_TOKEN


@dataclass(slots=True)
class SlotUpdate:
    """What the device does to one row's slot before the row's penalties read it."""

    slot: int
    reset: bool  # zero the slot's counts and in_prompt, then mark `prompt`'s tokens in in_prompt
    prompt: Sequence[int]  # the prompt's token ids when reset, else empty
    new_tokens: Sequence[int]  # output tokens the device has not counted yet: add them to counts


class PenaltySlots:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"penalty slots: need at least one, got {num_slots}")
        self.num_slots = num_slots
        self.clear()

    def clear(self) -> None:
        """Forget every slot: each request's next row starts over (GpuSampler reallocated the state
        for another vocabulary, or planned updates never reached the device)."""
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.counted = [0] * self.num_slots  # output tokens of the slot's request counted on the device
        self._prompt: list = [None] * self.num_slots  # the prompt list the slot was filled from

    def slot_of(self, key: Hashable) -> int | None:
        return self._slots.get(key)

    def plan(self, meta: SamplingMetadata, sampling: bool) -> list[SlotUpdate | None]:
        """This call's slot work: a SlotUpdate per row with a penalty, None for the other rows.
        sampling: the call samples, so the device counts each of these rows' new token (sample_kernel)."""
        rows = meta.penalized_rows
        if len(rows) > self.num_slots:
            raise ValueError(f"{len(rows)} rows with penalties, {self.num_slots} penalty slots (max_num_seqs)")
        ids = meta.request_ids
        if ids is not None and None not in ids:  # the engine's case: every row has its request's id
            keys, anonymous = [ids[i] for i in rows], []
        else:
            keys = [ids[i] if ids is not None and ids[i] is not None else object() for i in rows]
            anonymous = [k for i, k in zip(rows, keys) if ids is None or ids[i] is None]  # keys for this call only
        if len(set(keys)) < len(keys):
            raise ValueError("a request id appears in two rows of one sampling call")
        slots, counted, slot_prompt, free = self._slots, self.counted, self._prompt, self._free
        for k in keys:  # this call's slots become the most recent: the evictions below never take them
            if k in slots:
                slots.move_to_end(k)
        outputs, prompts, extra = meta.output_token_ids, meta.prompt_token_ids, 1 if sampling else 0
        updates: list[SlotUpdate | None] = [None] * meta.num_rows
        for i, k in zip(rows, keys):
            out, prompt = outputs[i], prompts[i]
            slot = slots.get(k)
            reset = slot is None or slot_prompt[slot] is not prompt or counted[slot] > len(out)
            if slot is None:
                # With no free slot, the least recently used one: not this call's (at most
                # num_slots rows, and those already placed sit at the recent end).
                slot = free.pop() if free else slots.popitem(last=False)[1]
                slots[k] = slot
            slot_prompt[slot] = prompt
            new = out[0 if reset else counted[slot]:]  # empty in the steady state
            if PLACEHOLDER in new:  # an engine bug; rows before this one were planned: start all over
                self.clear()
                raise RuntimeError(f"row {i} (request {ids[i] if ids else None!r}): an output placeholder the "
                                   f"device has not counted (a row without an id, or a slot lost with a token in flight)")
            counted[slot] = len(out) + extra
            updates[i] = SlotUpdate(slot, reset, prompt if reset else (), new)
        self.release(anonymous)  # their device work is queued already; a later call resets the slots
        return updates

    def release(self, keys) -> None:
        """Frees the slots of these keys (finished requests); unknown keys are ignored."""
        for k in keys:
            slot = self._slots.pop(k, None)
            if slot is not None:
                self._free.append(slot)
                self._prompt[slot] = None
