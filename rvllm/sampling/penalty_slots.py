"""Per-request penalty state on the device, the host's side: which slot holds which request, and how
much of its output the device has counted.

GpuSampler keeps, per slot s of S (S = max_num_seqs), `counts[s, v]` (int32: how often token v
occurs in the request's output so far) and `seen[s, v]` (uint8: 1 where v occurs in its prompt or
its output); process_logits_kernel reads `seen` densely and, where a token is seen, applies the
repetition penalty and the frequency and presence penalties from its count. The device counts
(and marks seen) every token it samples for a row with a slot (sample_kernel, race_kernel), so the
host uploads only what the device has not seen: the prompt and the whole output when a request
gets a slot, nothing in the steady state. Under async scheduling the newest output token may be a
placeholder that only the device knows; it was counted when it was sampled, so it is never uploaded.

Slots are keyed by request id (SamplingMetadata.request_ids). A request without a slot takes a free
one or evicts the least recently used slot not used by this call (keyed_slots.KeyedSlots); a
request that comes back after losing its slot (preempted, evicted) simply gets a new one and a full
upload. The runner releases finished requests' slots (an optimization: eviction alone is correct).
Rows without an id get a fresh key for one call. A slot starts over when its row brings another
prompt list than the one it was filled from (a new request under a reused id: the slot holds the
request's own list, so `is` tells) or an output shorter than what the device counted.

The steady state (the same requests in the same rows as the last call, each with the prompt its slot
holds and an output of exactly the length the device has counted: it grew by the token the last
call sampled, placeholder or not) plans no upload: plan() then checks whole lists in C, not row by
row, and hands back the last steady call's updates.

Pure Python: the device work is one SlotUpdate per row, which process_logits_kernel carries out
before it reads the slot; the CPU tests replay them on NumPy arrays.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from operator import is_

from rvllm.keyed_slots import KeyedSlots
from rvllm.sampling.metadata import SamplingMetadata

# engine/request.py's PLACEHOLDER: an output token sampled on the device, not known on the host yet.
PLACEHOLDER = -1
STATE_BYTES_PER_TOKEN = 4 + 1  # counts (int32) and seen (uint8), per slot and vocabulary entry


def state_bytes(num_slots: int, vocab: int) -> int:
    """Device memory of the penalty state (GpuSampler allocates it on first use); the engine keeps
    it out of the KV cache's budget so that first use cannot run out of memory."""
    return num_slots * vocab * STATE_BYTES_PER_TOKEN


@dataclass(slots=True)
class SlotUpdate:
    """What the device does to one row's slot before the row's penalties read it."""

    slot: int
    reset: bool  # zero the slot's counts and seen, then mark `prompt`'s tokens seen
    prompt: Sequence[int]  # the prompt's token ids when reset, else empty
    new_tokens: Sequence[int]  # output tokens the device has not counted yet: add them to counts, mark them seen


@dataclass(slots=True)
class _LastCall:
    """PenaltySlots' last call, for the next one's fast path."""

    ids: list  # request ids, per row
    rows: list[int]  # the penalized rows
    prompts: list  # per penalized row, its prompt list (the one its slot holds)
    slots: list[int]  # per penalized row, its slot
    counts: list[int]  # per penalized row, the output tokens the device has counted
    updates: list | None = None  # the steady state's updates, once a call was steady


class PenaltySlots:
    def __init__(self, num_slots: int):
        self._keys = KeyedSlots(num_slots, "penalty slots")
        self.num_slots = num_slots
        self.clear()

    def clear(self) -> None:
        """Forget every slot: each request's next row starts over (GpuSampler reallocated the state
        for another vocabulary, or planned updates never reached the device)."""
        self._keys.clear()
        self._counted = [0] * self.num_slots  # output tokens of the slot's request counted on the device
        self._prompt: list = [None] * self.num_slots  # the prompt list the slot was filled from
        self._last: _LastCall | None = None  # when every row had an id: the next call's fast path
        self._deferred = False  # the fast path left the last call's counts in _last, not in _counted yet

    @property
    def counted(self) -> list[int]:
        """Per slot, the output tokens of its request that the device has counted."""
        self._settle()
        return self._counted

    def slot_of(self, key: Hashable) -> int | None:
        return self._keys.slot_of(key)

    def plan(self, meta: SamplingMetadata, sampling: bool) -> list[SlotUpdate | None]:
        """This call's slot work: a SlotUpdate per row with a penalty, None for the other rows (the
        list and its updates may be the last call's: read them, do not change them).
        sampling: the call samples, so the device counts each of these rows' new token (sample_kernel)."""
        rows = meta.penalized_rows
        if len(rows) > self.num_slots:
            raise ValueError(f"{len(rows)} rows with penalties, {self.num_slots} penalty slots (max_num_seqs)")
        ids = meta.request_ids
        steady = self._steady(meta, sampling)
        if steady is not None:
            return steady
        self._settle()
        if ids is not None and None not in ids:  # the engine's case: every row has its request's id
            keys, anonymous = [ids[i] for i in rows], []
        else:
            keys = [ids[i] if ids is not None and ids[i] is not None else object() for i in rows]
            anonymous = [k for i, k in zip(rows, keys) if ids is None or ids[i] is None]  # keys for this call only
        if len(set(keys)) < len(keys):
            raise ValueError("a request id appears in two rows of one sampling call")
        slots, placed = self._keys.place(keys)
        counted, slot_prompt = self._counted, self._prompt
        for j in placed:
            slot_prompt[slots[j]] = None  # the evicted request's prompt, if any: the slot starts over
        outputs, prompts, extra = meta.output_token_ids, meta.prompt_token_ids, 1 if sampling else 0
        updates: list[SlotUpdate | None] = [None] * meta.num_rows
        counts = []
        for i, slot in zip(rows, slots):
            out, prompt = outputs[i], prompts[i]
            reset = slot_prompt[slot] is not prompt or counted[slot] > len(out)
            slot_prompt[slot] = prompt
            new = out[0 if reset else counted[slot]:]  # empty in the steady state
            if PLACEHOLDER in new:  # an engine bug; rows before this one were planned: start all over
                self.clear()
                raise RuntimeError(f"row {i} (request {ids[i] if ids else None!r}): an output placeholder the "
                                   f"device has not counted (a row without an id, or a slot lost with a token in flight)")
            counted[slot] = len(out) + extra
            counts.append(counted[slot])
            updates[i] = SlotUpdate(slot, reset, prompt if reset else (), new)
        self._keys.release(anonymous)  # their device work is queued already; a later call resets the slots
        self._last = None if anonymous else _LastCall(list(ids), list(rows), [prompts[i] for i in rows], slots, counts)
        return updates

    def _steady(self, meta: SamplingMetadata, sampling: bool) -> list[SlotUpdate | None] | None:
        """plan()'s result when the call is the steady state (the module's docstring), else None.
        What the per-row loop would find then: every row's slot kept, no reset, no new token."""
        last, ids, rows = self._last, meta.request_ids, meta.penalized_rows
        if last is None or ids != last.ids or rows != last.rows:  # list != runs in C, identity first
            return None
        outputs, prompts = meta.output_token_ids, meta.prompt_token_ids
        if len(rows) != meta.num_rows:  # else every row has a penalty: the lists as they are
            outputs, prompts = list(map(outputs.__getitem__, rows)), list(map(prompts.__getitem__, rows))
        lens = list(map(len, outputs))
        if lens != last.counts or not all(map(is_, prompts, last.prompts)):
            return None
        if last.updates is None:  # the first steady call: the same updates serve every later one
            last.updates = [None] * meta.num_rows
            for i, slot in zip(rows, last.slots):
                last.updates[i] = SlotUpdate(slot, False, (), ())
        last.counts = [n + 1 for n in lens] if sampling else lens
        self._deferred = True
        return last.updates

    def _settle(self) -> None:
        """Writes the counts the fast path left in _last into _counted."""
        if self._deferred:
            counted = self._counted
            for slot, n in zip(self._last.slots, self._last.counts):
                counted[slot] = n
            self._deferred = False

    def release(self, keys) -> None:
        """Frees the slots of these keys (finished requests); unknown keys are ignored."""
        self._settle()
        freed = self._keys.release(keys)
        for slot in freed:
            self._prompt[slot] = None
        if freed:  # the last call's rows no longer all hold their slots
            self._last = None
