"""KV cache blocks: reference counts, an LRU free queue, and the prefix cache (chained block hashes).

A block is in one of three states:
  in use          ref_cnt > 0, not in the free queue; maybe cached (shared by requests with one prefix)
  free, cached    ref_cnt == 0, in the free queue, still holds a hash: a later request with the same
                  prefix can take it back with touch() until allocate() evicts it
  free, empty     ref_cnt == 0, in the free queue, no hash

The free queue is LRU: allocate() takes from the front, free() appends to the back. A request's
blocks are freed tail first, so its last blocks (the least likely to be shared) are evicted first.

"Cannot allocate" is a return value (None), not an exception: the scheduler reacts by preempting.
Pure Python on ints and lists; see vLLM v1/core/block_pool.py and nano-vllm block_manager.py.
"""
from __future__ import annotations

import hashlib
from array import array

from collections.abc import Iterable, Iterator, Sequence

# Parent hash of the first block of every sequence. A fixed int (not hash("...")), so block hashes do
# not depend on PYTHONHASHSEED: Python's hash of ints and tuples of ints is the same in every process.
ROOT_BLOCK_HASH = 0x72766C6C6D  # "rvllm"


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of one full block, chained from its parent's so equal hashes mean equal whole prefixes.

    SHA-256 (truncated to 128 bits) rather than Python's hash: a server shares its cache between
    users, and a crafted collision would hand one user another's KV (vLLM's CVE-2025-25183).
    About 1 us per block.
    """
    data = parent_hash.to_bytes(16, "little") + array("q", token_ids).tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "little")


class FreeBlockQueue:
    """Free block ids in LRU order: a doubly linked list kept in two int lists indexed by block id.

    O(1) popleft, append and removal from the middle, with no allocation per operation. (An
    OrderedDict does the same but, under this pop-front/append-back churn, rebuilds its hash table
    every so often: a 2 ms pause at 16k blocks, 6 ms at 64k, in the middle of a step.)
    """

    def __init__(self, num_blocks: int):
        end = num_blocks  # a sentinel node: next[end] is the front, prev[end] the back
        self._end = end
        self._next = list(range(1, num_blocks + 1)) + [0]
        self._prev = [end] + list(range(num_blocks))
        self._len = num_blocks

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        nxt, end = self._next, self._end
        b = nxt[end]
        while b != end:
            yield b
            b = nxt[b]

    def popleft_n(self, n: int) -> list[int]:
        """The n least recently freed blocks (the caller checks that n <= len)."""
        nxt, prv, end = self._next, self._prev, self._end
        out = []
        b = nxt[end]
        for _ in range(n):
            out.append(b)
            b = nxt[b]
        nxt[end] = b
        prv[b] = end
        self._len -= n
        return out

    def append(self, b: int) -> None:
        nxt, prv, end = self._next, self._prev, self._end
        last = prv[end]
        nxt[last] = b
        prv[b] = last
        nxt[b] = end
        prv[end] = b
        self._len += 1

    def remove(self, b: int) -> None:
        nxt, prv = self._next, self._prev
        before, after = prv[b], nxt[b]
        nxt[before] = after
        prv[after] = before
        self._len -= 1


class BlockPool:
    """Blocks 0..num_blocks-1 of `block_size` token slots each; none are reserved."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks  # set iff cached[block_hash[b]] == b
        self.free_queue = FreeBlockQueue(num_blocks)  # exactly the blocks with ref_cnt 0
        self.cached: dict[int, int] = {}  # block hash -> block id; one block per hash
        # Prefix cache stats in tokens, as vLLM counts them: queries = prompt tokens looked up,
        # hits = tokens found computed. Counted by the KV cache manager on first admission.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- allocate / free ------------------------------------------------------------------------
    def get_num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: free empty ones plus free cached ones (evictable)."""
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int] | None:
        """Take n blocks (ref 1) from the front of the free queue, evicting their hashes; None if short."""
        if n > len(self.free_queue):
            return None
        out = self.free_queue.popleft_n(n)
        ref_cnt, block_hash = self.ref_cnt, self.block_hash
        for block_id in out:
            h = block_hash[block_id]
            if h is not None:  # evict: this block's contents are about to be overwritten
                del self.cached[h]
                block_hash[block_id] = None
            ref_cnt[block_id] = 1
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to each block (prefix-cache hits), pulling free ones off the queue."""
        ref_cnt, free_queue = self.ref_cnt, self.free_queue
        for block_id in block_ids:
            if ref_cnt[block_id] == 0:
                free_queue.remove(block_id)
            ref_cnt[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block, last block first; those reaching 0 join the free queue.

        Freeing in reverse puts a request's tail at the front of the LRU order, so it is evicted
        before the prefix blocks that other requests are more likely to share.
        """
        ref_cnt, append = self.ref_cnt, self.free_queue.append
        for block_id in reversed(block_ids):
            ref = ref_cnt[block_id]
            if ref <= 0:
                raise RuntimeError(f"block {block_id} freed more times than it was allocated or touched")
            ref_cnt[block_id] = ref - 1
            if ref == 1:
                append(block_id)

    # ---- prefix cache ---------------------------------------------------------------------------
    def get_cached_block(self, block_hash: int) -> int | None:
        """The block holding the full block with this chained hash, or None."""
        return self.cached.get(block_hash)

    def cache_full_blocks(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """Register full blocks whose KV has been computed under their chained hashes.

        If another block already holds a hash (two requests with one prompt computed it in the same
        step), the first one stays the cached copy and this block remains private to its request.
        """
        if not self.enable_caching:
            return
        cached, block_hash = self.cached, self.block_hash
        for block_id, h in zip(block_ids, block_hashes):
            if block_hash[block_id] is None and h not in cached:
                cached[h] = block_id
                block_hash[block_id] = h

    # ---- stats ----------------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref > 0); free cached blocks count as free."""
        return 1.0 - len(self.free_queue) / self.num_blocks
