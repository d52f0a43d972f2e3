"""Approximate prefix-cache affinity: send a prompt where its prefix was sent before.

The prompt (text, or token ids when the request carries them) is cut into blocks; block i's hash
chains block i-1's (xxhash64), so equal hashes mean equal prefixes. Each endpoint keeps an LRU of the
block hashes EPP sent it, inserted optimistically when it is picked. The score is the fraction of the
request's blocks that the endpoint holds as an unbroken prefix run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from struct import Struct

import xxhash

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.plugins import CycleState, RequestObserver, SchedulingResult, Scorer
from epp.scheduling.registry import register_plugin

_U64 = Struct("<Q")
_CHARS_PER_TOKEN = 4  # GIE's estimate when hashing characters


def block_hashes(request: InferenceRequest, block_tokens: int, max_blocks: int) -> list[int]:
    """Chained hashes of the request's full blocks (a trailing partial block is hashed too)."""
    seed = xxhash.xxh64_intdigest(f"{request.target_model or request.model}\0{request.body.cache_salt or ''}".encode())
    ids = request.body.prompt_token_ids
    if ids is not None:
        data = b"".join(i.to_bytes(4, "little") for i in ids[: block_tokens * max_blocks])
        step = block_tokens * 4
    else:
        text = request.body.prompt_text or ""
        data = text[: block_tokens * _CHARS_PER_TOKEN * max_blocks].encode("utf-8", "surrogatepass")
        step = block_tokens * _CHARS_PER_TOKEN
    if len(data) < step:
        return []
    hashes = []
    prev = seed
    for off in range(0, len(data), step):
        prev = xxhash.xxh64_intdigest(data[off: off + step] + _U64.pack(prev))
        hashes.append(prev)
    return hashes


@register_plugin("prefix-cache-scorer")
class PrefixCacheScorer(Scorer, RequestObserver):
    category = "affinity"

    def __init__(self, block_size_tokens: int = 16, max_prefix_blocks_to_match: int = 256,
                 lru_capacity_per_server: int = 31250, auto_tune: bool = True) -> None:
        if block_size_tokens < 1 or max_prefix_blocks_to_match < 1 or lru_capacity_per_server < 1:
            raise ValueError("blockSizeTokens, maxPrefixBlocksToMatch and lruCapacityPerServer must be >= 1")
        self.block_tokens = block_size_tokens
        self.max_blocks = max_prefix_blocks_to_match
        self.capacity = lru_capacity_per_server
        self.auto_tune = auto_tune
        self._index: dict[str, OrderedDict[int, None]] = {}  # endpoint name -> LRU of block hashes

    def start(self) -> None:
        if self.handle and self.handle.pool:
            self.handle.pool.add_listener(self._forget_removed)

    def _forget_removed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:
            self._index.pop(e.name, None)

    def _capacity(self, endpoint: Endpoint) -> int:
        blocks = endpoint.metrics.num_gpu_blocks
        return blocks if self.auto_tune and blocks else self.capacity

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        hashes = block_hashes(request, self.block_tokens, self.max_blocks)
        request.attributes[self.name] = hashes  # for pre_request, once the pick is known
        if not hashes:
            return [0.0] * len(endpoints)
        scores = []
        for e in endpoints:
            lru = self._index.get(e.name)
            n = 0
            if lru:
                for h in hashes:
                    if h not in lru:
                        break
                    n += 1
            scores.append(n / len(hashes))
        return scores

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = request.attributes.get(self.name)
        if not hashes or not result.endpoints:
            return
        target = result.endpoints[0]
        lru = self._index.setdefault(target.name, OrderedDict())
        for h in hashes:
            lru[h] = None
            lru.move_to_end(h)
        cap = self._capacity(target)
        while len(lru) > cap:
            lru.popitem(last=False)
