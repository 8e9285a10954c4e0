"""BlockPool and KVCacheManager against a plain model of who holds which block and what it contains."""
from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rvllm.engine.block_pool import ROOT_BLOCK_HASH, BlockPool, hash_block_tokens
from rvllm.engine.kv_cache_manager import KVCacheManager
from rvllm.engine.request import Request
from rvllm.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 12
# A two-letter alphabet makes equal prefixes (cache hits) and equal blocks under different parents common.
tokens_st = st.lists(st.integers(0, 1), min_size=1, max_size=6 * BLOCK_SIZE)


def chain_hashes(tokens: list[int], num_blocks: int) -> list[int]:
    out, parent = [], ROOT_BLOCK_HASH
    for i in range(num_blocks):
        parent = hash_block_tokens(parent, tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
        out.append(parent)
    return out


def check_pool(pool: BlockPool, holders: list[list[int]], content: dict[int, tuple]) -> None:
    """holders: the block lists that hold one reference each; content[b]: the whole prefix b ends."""
    refs = [0] * pool.num_blocks
    for blocks in holders:
        for b in blocks:
            refs[b] += 1
    assert pool.ref_cnt == refs
    free = list(pool.free_queue)
    assert len(free) == len(set(free)) == pool.get_num_free_blocks()
    q = pool.free_queue  # the back links must agree with the forward walk
    backward, b = [], q._prev[q._end]
    while b != q._end:
        backward.append(b)
        b = q._prev[b]
    assert backward == free[::-1]
    assert set(free) == {b for b in range(pool.num_blocks) if refs[b] == 0}
    assert len(free) + sum(r > 0 for r in refs) == pool.num_blocks  # no leaks
    assert pool.usage == pytest.approx(sum(r > 0 for r in refs) / pool.num_blocks)
    for h, b in pool.cached.items():
        assert pool.block_hash[b] == h
        prefix = content[b]  # a cached block has been written in full
        assert chain_hashes(list(prefix), len(prefix) // BLOCK_SIZE)[-1] == h
    assert sum(h is not None for h in pool.block_hash) == len(pool.cached)


class BlockPoolMachine(RuleBasedStateMachine):
    """allocate / touch (prefix hits) / cache / free / double free, checking the LRU order exactly."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BLOCK_SIZE)
        self.holders: dict[int, list[int]] = {}  # holder id -> its blocks, in sequence order
        self.tokens: dict[int, list[int]] = {}  # holder id -> the tokens its blocks hold
        self.content: dict[int, tuple] = {}  # block -> prefix written in it (only full, cached ones matter)
        self.expected_free = list(range(NUM_BLOCKS))  # LRU order the pool must keep
        self.next_id = 0

    def _add_holder(self, blocks: list[int], tokens: list[int]) -> None:
        self.holders[self.next_id] = blocks
        self.tokens[self.next_id] = tokens
        self.next_id += 1

    @rule(seq=st.lists(st.integers(0, 1), min_size=1, max_size=8 * BLOCK_SIZE))
    def allocate(self, seq):
        n = -(-len(seq) // BLOCK_SIZE)
        free_before = self.pool.get_num_free_blocks()
        cached_before = dict(self.pool.cached)
        blocks = self.pool.allocate(n)
        if n > free_before:
            assert blocks is None and self.pool.cached == cached_before
            return
        assert blocks == self.expected_free[:n]  # least recently freed first
        del self.expected_free[:n]
        for b in blocks:
            self.content.pop(b, None)  # evicted: about to be overwritten
        self._add_holder(blocks, seq)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def compute_and_cache(self, data):
        """The holder's full blocks get their KV written, then registered under their chained hashes."""
        hid = data.draw(st.sampled_from(sorted(self.holders)))
        blocks, seq = self.holders[hid], self.tokens[hid]
        num_full = len(seq) // BLOCK_SIZE
        hashes = chain_hashes(seq, num_full)
        for i, b in enumerate(blocks[:num_full]):
            prefix = tuple(seq[:(i + 1) * BLOCK_SIZE])
            if self.pool.block_hash[b] is None:
                self.content[b] = prefix  # a private block: (re)written by its holder
            else:
                assert self.content[b] == prefix  # a shared block: must already hold this prefix
        before = {h: self.pool.get_cached_block(h) for h in hashes}
        self.pool.cache_full_blocks(blocks[:num_full], hashes)
        for b, h in zip(blocks[:num_full], hashes):
            # The first block to hold a prefix stays its cached copy; otherwise this one becomes it.
            assert self.pool.get_cached_block(h) == (b if before[h] is None else before[h])

    @rule(seq=tokens_st)
    def touch_cached_prefix(self, seq):
        """A prefix lookup: take a reference to the leading blocks found in the cache."""
        hits = []
        for h in chain_hashes(seq, len(seq) // BLOCK_SIZE):
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            hits.append(b)
        for i, b in enumerate(hits):
            assert self.content[b] == tuple(seq[:(i + 1) * BLOCK_SIZE])
        if not hits:
            return
        self.pool.touch(hits)
        self.expected_free = [b for b in self.expected_free if b not in hits]
        self._add_holder(hits, seq[:len(hits) * BLOCK_SIZE])

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free(self, data):
        hid = data.draw(st.sampled_from(sorted(self.holders)))
        blocks = self.holders.pop(hid)
        del self.tokens[hid]
        self.pool.free(blocks)
        for b in reversed(blocks):  # the tail joins the queue first, so it is evicted first
            if not any(b in other for other in self.holders.values()):
                self.expected_free.append(b)

    @precondition(lambda self: self.pool.get_num_free_blocks() > 0)
    @rule(data=st.data())
    def double_free_raises(self, data):
        b = data.draw(st.sampled_from(sorted(self.pool.free_queue)))
        with pytest.raises(RuntimeError):
            self.pool.free([b])

    @invariant()
    def consistent(self):
        check_pool(self.pool, list(self.holders.values()), self.content)
        assert list(self.pool.free_queue) == self.expected_free


class KVCacheManagerMachine(RuleBasedStateMachine):
    """Requests admitted with prefix hits, computed in chunks (possibly several allocated before any is
    computed, as in one step), growing by sampled tokens, freed. Hits must hold the request's prefix."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE)
        self.waiting: list[Request] = []
        self.running: dict[str, Request] = {}
        self.pending: dict[str, int] = {}  # tokens allocated for but not computed yet
        self.content: dict[int, tuple] = {}
        self.next_id = 0

    @rule(prompt=tokens_st)
    def add(self, prompt):
        self.waiting.append(Request(str(self.next_id), prompt, SamplingParams()))
        self.next_id += 1

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        req = data.draw(st.sampled_from(self.waiting))
        hits, num_cached = self.kv.get_computed_blocks(req)
        assert num_cached == len(hits) * BLOCK_SIZE
        assert num_cached <= req.num_tokens - 1  # the last token is always computed
        for i, b in enumerate(hits):
            assert self.content[b] == tuple(req.all_token_ids[:(i + 1) * BLOCK_SIZE])
        num_new = data.draw(st.integers(1, req.num_tokens - num_cached))
        free_before = self.kv.pool.get_num_free_blocks()
        if not self.kv.allocate_slots(req, num_new, hits):
            assert req.block_ids == [] and self.kv.pool.get_num_free_blocks() == free_before
            return
        for b in req.block_ids[len(hits):]:
            self.content.pop(b, None)  # fresh block: whatever it held is gone
        req.num_computed_tokens = num_cached
        self.waiting.remove(req)
        self.running[req.request_id] = req
        self.pending[req.request_id] = num_new

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def compute(self, data):
        """The runner writes KV for the pending tokens; then their full blocks become shareable."""
        rid = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if n)))
        req = self.running[rid]
        before = req.num_computed_tokens // BLOCK_SIZE
        req.num_computed_tokens += self.pending[rid]
        self.pending[rid] = 0
        for i in range(before, req.num_computed_tokens // BLOCK_SIZE):
            b = req.block_ids[i]
            prefix = tuple(req.all_token_ids[:(i + 1) * BLOCK_SIZE])
            assert self.content.get(b, prefix) == prefix  # never overwrite someone else's prefix
            self.content[b] = prefix
        self.kv.cache_computed_blocks(req)

    @precondition(lambda self: any(not n for n in self.pending.values()))
    @rule(data=st.data(), token=st.integers(0, 1))
    def grow(self, data, token):
        """Sample a token if caught up, then allocate for some of the remaining tokens (a decode or chunk)."""
        rid = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if not n)))
        req = self.running[rid]
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token(token, 0.0)
        num_new = data.draw(st.integers(1, req.num_tokens - req.num_computed_tokens))
        blocks_before, free_before = list(req.block_ids), self.kv.pool.get_num_free_blocks()
        if self.kv.allocate_slots(req, num_new):
            for b in req.block_ids[len(blocks_before):]:
                self.content.pop(b, None)
            self.pending[rid] = num_new
        else:
            assert req.block_ids == blocks_before and self.kv.pool.get_num_free_blocks() == free_before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        req = self.running.pop(rid)
        del self.pending[rid]
        self.kv.free(req)
        assert req.block_ids == []

    @invariant()
    def consistent(self):
        check_pool(self.kv.pool, [r.block_ids for r in self.running.values()], self.content)
        for rid, req in self.running.items():
            need = req.num_computed_tokens + self.pending[rid]
            assert len(req.block_ids) == -(-need // BLOCK_SIZE)
        pool = self.kv.pool
        assert 0 <= pool.prefix_hits <= pool.prefix_queries


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestKVCacheManager = KVCacheManagerMachine.TestCase
TestKVCacheManager.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


def test_whole_prompt_cached_leaves_last_block_to_compute():
    kv = KVCacheManager(8, BLOCK_SIZE)
    first = Request("a", list(range(8)), SamplingParams())
    assert kv.allocate_slots(first, 8, [])
    first.num_computed_tokens = 8
    kv.cache_computed_blocks(first)
    assert len(kv.pool.cached) == 2

    twin = Request("b", list(range(8)), SamplingParams())
    hits, n = kv.get_computed_blocks(twin)
    assert hits == first.block_ids[:1] and n == 4  # (8 - 1) // 4 = 1 block, not 2
    longer = Request("c", list(range(9)), SamplingParams())
    hits, n = kv.get_computed_blocks(longer)
    assert hits == first.block_ids and n == 8


def test_freed_cached_blocks_are_reused_then_evicted_tail_first():
    kv = KVCacheManager(4, BLOCK_SIZE)
    a = Request("a", list(range(12)), SamplingParams())
    assert kv.allocate_slots(a, 12, [])
    a.num_computed_tokens = 12
    kv.cache_computed_blocks(a)
    kv.free(a)
    assert kv.usage == 0.0 and len(kv.pool.cached) == 3  # free but still cached
    assert list(kv.pool.free_queue) == [3, 2, 1, 0]  # the never-used block, then a's blocks tail first

    b = Request("b", list(range(8)) + [99, 99, 99], SamplingParams())
    hits, n = kv.get_computed_blocks(b)
    assert hits == [0, 1] and n == 8
    assert kv.allocate_slots(b, 3, hits)  # needs 1 fresh block: block 3 (never used) goes first
    assert b.block_ids == [0, 1, 3]
    assert kv.pool.cached.get(chain_hashes(list(range(12)), 3)[2]) == 2  # a's tail still cached
    c = Request("c", [7] * 4, SamplingParams())
    assert kv.allocate_slots(c, 4, [])
    assert c.block_ids == [2] and len(kv.pool.cached) == 2  # a's tail evicted
    assert kv.pool.prefix_queries == 12 + 11 + 4 and kv.pool.prefix_hits == 8


def test_hits_on_free_blocks_count_against_free_space():
    kv = KVCacheManager(3, BLOCK_SIZE)
    a = Request("a", list(range(8)), SamplingParams())
    assert kv.allocate_slots(a, 8, [])
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    kv.free(a)
    b = Request("b", list(range(8)) + [5] * 9, SamplingParams())  # 2 hits + 3 fresh blocks > 3 free
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    assert not kv.allocate_slots(b, 9, hits)
    assert b.block_ids == [] and kv.pool.get_num_free_blocks() == 3 and kv.pool.ref_cnt == [0, 0, 0]
    assert kv.allocate_slots(b, 4, hits)  # a smaller chunk fits: 2 hits + 1 fresh
    assert kv.pool.ref_cnt == [1, 1, 1]
