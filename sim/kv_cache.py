"""A paged KV cache with block-hash prefix caching, shaped like vLLM V1's KVCacheManager/BlockPool.

- The cache has `num_blocks` blocks of `block_size` tokens.
- Only full blocks are hashed. Block i's hash chains the previous block's hash with block i's token ids;
  the chain's root is seeded by model (LoRA name for LoRA requests) and cache_salt, so those never share.
- Blocks carry reference counts. A block whose count drops to 0 stays in the hash table (still a cache hit)
  but joins the tail of the free queue; allocation takes blocks from the head (least recently freed) and
  only then evicts their hash. A request's blocks are freed tail-first, so its last blocks go first.
- Usage = blocks with a reference / all blocks (free-but-cached blocks count as free, as in vLLM).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from itertools import islice, takewhile
from operator import is_not
from typing import Any, Protocol

import xxhash

_h64 = xxhash.xxh3_64_intdigest
_not_none = partial(is_not, None)


def hash_root(model: str, cache_salt: str | None, seed: int) -> int:
    return _h64(f"{model}\x00{cache_salt or ''}".encode(), seed=seed & 0xFFFFFFFFFFFFFFFF)


def chain_hashes(token_bytes: bytes, parent: int, first_block: int, last_block: int,
                 block_size: int) -> list[int]:
    """Hashes of full blocks [first_block, last_block) of a uint32 token byte string, chained from parent."""
    out = []
    append = out.append
    stride = block_size * 4
    for start in range(first_block * stride, last_block * stride, stride):
        parent = _h64(token_bytes[start:start + stride], parent)  # seed positional: a keyword costs twice the hash
        append(parent)
    return out


class CacheUser(Protocol):
    """What the cache needs from a request."""

    blocks: list[int]
    num_cached_blocks: int
    lora: str | None

    def block_hash(self, index: int) -> int: ...

    def block_hashes(self, n: int) -> list[int]:
        """The hashes of the first ``n`` blocks (the list may go on)."""
        ...

    def block_tokens(self, index: int) -> list[int]: ...

    @property
    def num_tokens(self) -> int: ...


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 collect_events: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Insertion order is the LRU order: the first key is evicted first.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.events: list[tuple[Any, ...]] | None = [] if collect_events else None
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def num_cached(self) -> int:
        return len(self.hash_to_block)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def lookup(self, req: CacheUser) -> list[int]:
        """Longest run of cached blocks from the start of the request's tokens.

        vLLM always recomputes at least the last token (it needs its logits), so a hit never covers the
        whole known sequence: at most (num_tokens - 1) // block_size blocks.
        """
        if not self.enable_caching:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        if limit <= 0:
            return []
        return list(takewhile(_not_none, map(self.hash_to_block.get, islice(req.block_hashes(limit), limit))))

    # -- allocation ------------------------------------------------------------------------------------
    def allocate(self, req: CacheUser, num_computed_tokens: int, num_new_tokens: int,
                 computed: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` after `num_computed_tokens`; adopt `computed` cache hits first.

        Returns False (changing nothing) when there are not enough free blocks.
        """
        computed = computed or []
        bs = self.block_size
        total = num_computed_tokens + num_new_tokens
        required = -(-total // bs)
        held = len(req.blocks)
        num_new_blocks = required - held - len(computed)
        ref = self.ref_cnt
        # Cache hits sitting in the free queue stop being free once adopted.
        reviving = [b for b in computed if not ref[b]]
        if num_new_blocks > len(self.free_queue) - len(reviving):
            return False
        free_queue = self.free_queue
        for b in reviving:
            del free_queue[b]
        for b in computed:
            ref[b] += 1
        req.blocks.extend(computed)
        if computed and req.num_cached_blocks == held:
            req.num_cached_blocks = held + len(computed)  # cache hits: registered already
        if num_new_blocks > 0:
            popitem = free_queue.popitem
            blocks = req.blocks
            for _ in range(num_new_blocks):
                b = popitem(last=False)[0]
                if self.block_hash[b] is not None:
                    self._evict(b)
                ref[b] = 1
                blocks.append(b)
        if self.enable_caching:
            # Like vLLM, register blocks that will be full once this step's tokens are computed.
            full = min(total, req.num_tokens) // bs
            if full > req.num_cached_blocks:
                self._cache_blocks(req, req.num_cached_blocks, full)
        return True

    def _cache_blocks(self, req: CacheUser, start: int, end: int) -> None:
        table = self.hash_to_block
        bh = self.block_hash
        stored = [] if self.events is not None else None
        hashes = req.block_hashes(end)
        blocks = req.blocks
        for i in range(start, end):
            h = hashes[i]
            b = blocks[i]
            if bh[b] is not None:  # adopted from the cache: already registered
                continue
            bh[b] = h
            if h not in table:
                table[h] = b
                if stored is not None:
                    stored.append(i)
        req.num_cached_blocks = end
        if stored and self.events is not None:
            parent = req.block_hash(stored[0] - 1) if stored[0] > 0 else None
            tokens: list[int] = []
            for i in stored:
                tokens.extend(req.block_tokens(i))
            self.events.append(("BlockStored", [req.block_hash(i) for i in stored], parent, tokens,
                                self.block_size, req.lora))

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        self.block_hash[b] = None
        if h is not None and self.hash_to_block.get(h) == b:
            del self.hash_to_block[h]
            self.evictions += 1
            if self.events is not None:
                self.events.append(("BlockRemoved", [h]))

    def free(self, req: CacheUser) -> None:
        """Drop the request's references, tail block first so that it is evicted first."""
        ref = self.ref_cnt
        free_queue = self.free_queue
        for b in reversed(req.blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free_queue[b] = None
                if not self.enable_caching:
                    self.block_hash[b] = None
        req.blocks.clear()
        req.num_cached_blocks = 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds (vLLM: /reset_prefix_cache). Returns count."""
        dropped = 0
        for b in list(self.free_queue):
            if self.block_hash[b] is not None:
                h = self.block_hash[b]
                self.block_hash[b] = None
                if self.hash_to_block.get(h) == b:
                    del self.hash_to_block[h]
                    dropped += 1
        if self.events is not None and dropped:
            self.events.append(("AllBlocksCleared",))
        return dropped

    def drain_events(self) -> list[tuple[Any, ...]]:
        if not self.events:
            return []
        out = self.events
        self.events = []
        return out
