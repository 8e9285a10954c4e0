"""Request id -> slot with least-recently-used eviction (rvllm/keyed_slots.py), the mechanism under
the block tables, the penalty state and the parameter records; against a plain reference model."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rvllm.keyed_slots import KeyedSlots


def test_new_keys_take_free_slots_from_zero_and_keep_them():
    slots = KeyedSlots(3)
    assert slots.place(["a", "b"]) == ([0, 1], [0, 1])
    assert slots.place(["b", "c", "a"]) == ([1, 2, 0], [1])
    assert [slots.slot_of(k) for k in "abcd"] == [0, 1, 2, None]


def test_eviction_takes_the_least_recently_used_key_by_call_then_row():
    slots = KeyedSlots(3)
    slots.place(["a", "b", "c"])  # within a call, the earlier row is the older
    slots.place(["b"])
    assert slots.place(["d"]) == ([0], [0]) and slots.slot_of("a") is None  # a: oldest
    assert slots.place(["e"]) == ([2], [0]) and slots.slot_of("c") is None  # then c (b was used since)
    assert slots.place(["f"]) == ([1], [0]) and slots.slot_of("b") is None


def test_a_call_never_evicts_its_own_keys():
    slots = KeyedSlots(2)
    slots.place(["a", "b"])
    slots.place(["b"])  # a is the least recently used ...
    got, new = slots.place(["c", "a"])  # ... but in this call: c takes b's slot, a row after c's
    assert got == [1, 0] and new == [0] and slots.slot_of("b") is None
    with pytest.raises(ValueError, match="3 keys in one call, 2 slots"):
        slots.place(["a", "c", "d"])


def test_release_frees_slots_and_a_released_key_comes_back_new():
    slots = KeyedSlots(2)
    slots.place(["a", "b"])
    assert slots.release(["a", "unknown"]) == [0] and slots.slot_of("a") is None
    assert slots.place(["c", "b"]) == ([0, 1], [0])  # the freed slot, not an eviction of b
    slots.release(["c"])
    assert slots.place(["c", "b"]) == ([0, 1], [0])  # the same keys as the last call, but c was released


def test_a_repeated_key_is_refused():
    slots = KeyedSlots(3, "things")
    slots.place(["a"])
    with pytest.raises(ValueError, match="things: a key appears twice"):
        slots.place(["a", "b", "a"])
    assert slots.place(["x", "y", "z"]) == ([0, 1, 2], [0, 1, 2])  # every slot is usable again
    with pytest.raises(ValueError, match="things: need at least one"):
        KeyedSlots(0, "things")


@settings(max_examples=300, deadline=None)
@given(num_slots=st.integers(1, 4),
       calls=st.lists(st.one_of(st.lists(st.integers(0, 6), max_size=5, unique=True).map(lambda k: ("place", k)),
                                st.lists(st.integers(0, 8), max_size=3).map(lambda k: ("release", k))),
                      max_size=30))
def test_slots_follow_a_reference_model(num_slots, calls):
    """A list of (key, slot), least recently used first, and a stack of free slots, against
    KeyedSlots over random calls: the same slots, the same new keys, the same evictions."""
    slots = KeyedSlots(num_slots)
    order: list[tuple[int, int]] = []
    free = list(range(num_slots - 1, -1, -1))  # the top (the end) is handed out first
    for kind, keys in calls:
        if kind == "release":
            freed = []
            for k in keys:
                held = [e for e in order if e[0] == k]
                if held:
                    order.remove(held[0])
                    free.append(held[0][1])
                    freed.append(held[0][1])
            assert slots.release(keys) == freed
            continue
        if len(keys) > num_slots:
            with pytest.raises(ValueError, match="keys in one call"):
                slots.place(keys)
            continue
        held = dict(order)
        rest = [(k, s) for k, s in order if k not in keys]  # what this call may evict, oldest first
        want = [held.get(k, -1) for k in keys]
        new = [i for i, s in enumerate(want) if s < 0]
        for i in new:
            want[i] = free.pop() if free else rest.pop(0)[1]
        order = rest + list(zip(keys, want))
        assert slots.place(keys) == (want, new)
        assert [slots.slot_of(k) for k in range(9)] == [dict(order).get(k) for k in range(9)]
