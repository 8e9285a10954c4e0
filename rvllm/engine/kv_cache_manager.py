"""Per-request view of the block pool: prefix lookup, slot allocation, caching computed blocks, free.

A request's blocks live in request.block_ids (the runner reads them as the block table row); the
chained hashes of its full blocks in request.block_hashes (filled lazily, kept across preemption
since the tokens do not change). A block is registered in the prefix cache only once every token
in it has KV computed, i.e. after the step that computed it, never at allocation: so a request
scheduled in the same step as an identical one cannot read blocks that are not written yet.
"""
from __future__ import annotations

from rvllm.engine.block_pool import ROOT_BLOCK_HASH, BlockPool, hash_block_tokens
from rvllm.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        # request id -> how many of its leading blocks are registered in the prefix cache already.
        self.num_cached_blocks: dict[str, int] = {}

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of a request about to be admitted: (blocks, num_computed_tokens).

        Never the whole request: at most (num_tokens - 1) // block_size blocks, so at least the last
        token is computed and produces the logits for the next one.
        """
        if not self._reads_prefix_cache(request):
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        get = self.pool.cached.get
        blocks = []
        for h in hashes[:max_blocks]:
            block_id = get(h)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Make request.block_ids cover num_computed_tokens + num_new_tokens tokens.

        computed_blocks: prefix-cache hits from get_computed_blocks(), passed when the request is
        admitted from waiting (it then holds no blocks; the caller sets num_computed_tokens to the
        hit length after success). Call it right after get_computed_blocks(): any allocation in
        between may evict a hit. Returns False, changing nothing, when the pool is short.
        """
        hits = computed_blocks or []
        block_size = self.block_size
        total_tokens = request.num_computed_tokens + len(hits) * block_size + num_new_tokens
        num_needed = -(-total_tokens // block_size) - len(request.block_ids) - len(hits)
        if num_needed <= 0 and computed_blocks is None:  # the common decode step: the last block still has room
            return True
        # Hits with ref 0 sit in the free queue: touching them takes them out of what allocate() can use.
        ref_cnt = self.pool.ref_cnt
        num_evictable_hits = sum(1 for b in hits if ref_cnt[b] == 0)
        if max(num_needed, 0) + num_evictable_hits > self.pool.get_num_free_blocks():
            return False
        if hits:
            self.pool.touch(hits)  # before allocate(), so allocate() cannot evict them
            request.block_ids.extend(hits)
            self.num_cached_blocks[request.request_id] = len(hits)  # registered in the cache already
        if num_needed > 0:
            request.block_ids.extend(self.pool.allocate(num_needed))
        if computed_blocks is not None:
            self._count_prefix_lookup(request, len(hits) * block_size)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens in the prefix cache."""
        if not self.enable_caching:
            return
        # Blocks ending in a placeholder (async scheduling) wait until the token is known.
        known = request.num_tokens - request.num_pending
        num_full = min(request.num_computed_tokens, known) // self.block_size
        done = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = self._block_hashes(request, num_full)
        self.pool.cache_full_blocks(request.block_ids[done:num_full], hashes[done:num_full])
        self.num_cached_blocks[request.request_id] = num_full

    def hashes_filled(self, request: Request, start: int, end: int) -> list[int]:
        """Chained hashes of the blocks that computing tokens [start, end) completes."""
        end = min(end, request.num_tokens - request.num_pending)  # a placeholder's block has no hash yet
        first, last = start // self.block_size, end // self.block_size
        if last <= first or not self.enable_caching:
            return []
        return self._block_hashes(request, last)[first:last]

    def next_block_hash(self, request: Request, num_hit_blocks: int) -> int | None:
        """After get_computed_blocks(): the hash of the block after the hits, if it could be a hit too."""
        if num_hit_blocks >= (request.num_tokens - 1) // self.block_size or not self._reads_prefix_cache(request):
            return None
        return request.block_hashes[num_hit_blocks]

    def free(self, request: Request) -> None:
        """Give the request's blocks back (tail first); cached ones stay reusable until evicted."""
        self.pool.free(request.block_ids)
        request.block_ids = []
        self.num_cached_blocks.pop(request.request_id, None)

    @property
    def usage(self) -> float:
        return self.pool.usage

    # ---- helpers --------------------------------------------------------------------------------
    def _block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """request.block_hashes extended to at least num_blocks full blocks of its tokens."""
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            tokens, block_size = request.all_token_ids, self.block_size
            parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
            for i in range(len(hashes), num_blocks):
                parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size])
                hashes.append(parent)
        return hashes

    def _reads_prefix_cache(self, request: Request) -> bool:
        # Prompt logprobs need the logits of every prompt position, so such a request computes its
        # whole prompt (as in vLLM); its blocks are still cached for others.
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def _count_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        # Only first admissions count: a preempted request finding its own freed blocks again would
        # inflate the hit rate (vLLM keeps those in separate "preempted" counters).
        if request.num_preemptions == 0 and self._reads_prefix_cache(request):
            self.pool.prefix_queries += request.num_tokens
            self.pool.prefix_hits += num_hit_tokens
