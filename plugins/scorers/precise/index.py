"""Which endpoint holds which block, from the endpoints' own KV events.

Keys are ours, computed from token ids (so the engine's hash algorithm, seed and block size do not matter):
``key_i = xxh64(uint32-LE tokens of block i, seed=key_{i-1})`` with ``key_{-1} = xxh64(lora \\0 cache_salt,
seed=xxh64(hashSeed))``. The base model's blocks have no model in the root: one pool serves one base model,
and vLLM's default topic does not name it; a LoRA adapter's blocks are rooted at its name, so they only match
requests for that adapter (whose target model is the adapter's name).

Layout, chosen for memory (see bench/precise_prefix.py): one dict ``key -> bitmask of endpoint slots`` per
medium, and per endpoint ``engine hash -> our key`` (a tuple when an engine block spans several of ours) to
map ``BlockRemoved`` back. Speculative entries (picks whose events have not arrived) live in their own
``key -> mask`` dict and expire after ``ttl``.

Bounds and weights (llm-d's ``indexerConfig``): at most ``max_keys`` keys (blocks beyond are not indexed and
counted in ``skipped["index-full"]`` until removals make room); ``tier_weights`` scales how much a block held in a
medium counts in a match (llm-d's ``backendConfigs``: an endpoint's weight for a block is the highest among the
media holding it; the sum is truncated, as llm-d's ``matchBlocks``). Without weights every medium counts 1.

Threads: the ingestion thread is the only writer of the confirmed dicts and engine maps; the request path
reads them with single ``dict.get`` calls (atomic under the GIL) and owns the speculative dict.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable, Sequence

import xxhash

from epp_plugins.scorers.precise.events import AllBlocksCleared, BlockRemoved, BlockStored, Event
from epp_plugins.scorers.prefix.producer import DEFAULT_BLOCK_SIZE_TOKENS

_h64 = xxhash.xxh64_intdigest


class BlockKeys:
    """Our block keys: chained XXH64 over ``block_size`` tokens."""

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE_TOKENS, seed: str = "") -> None:
        self.block_size = block_size
        self.seed = _h64(seed.encode())

    def root(self, lora: str | None, salt: str | None) -> int:
        return _h64(f"{lora or ''}\0{salt or ''}".encode(), self.seed)

    def chain(self, tokens: Sequence[int], parent: int, max_blocks: int | None = None) -> list[int]:
        """Keys of the full blocks of ``tokens`` (at most ``max_blocks``), chained from ``parent``."""
        bs = self.block_size
        n = len(tokens) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        data = memoryview(array("I", tokens[: n * bs]).tobytes())
        step = bs * 4
        out = []
        for off in range(0, n * step, step):
            parent = _h64(data[off: off + step], parent)
            out.append(parent)
        return out


class BlockIndex:
    def __init__(self, keys: BlockKeys, speculative_ttl: float = 2.0, max_keys: int | None = None,
                 tier_weights: dict[str, float] | None = None) -> None:
        self.keys = keys
        self.ttl = speculative_ttl
        self.max_keys = max_keys
        self.weights = tier_weights  # medium (lower case) -> weight; None: every medium counts 1
        self.media: dict[str, dict[int, int]] = {"gpu": {}}
        self.engine: dict[int, dict[int, int | tuple[int, ...]]] = {}  # slot -> engine hash -> key(s)
        self.speculative: dict[int, int] = {}
        self._spec_expiry: deque[tuple[float, int, list[int]]] = deque()
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._lock = threading.Lock()  # slot allocation only
        self.skipped = {"orphan": 0, "block-size": 0, "index-full": 0}

    # -- endpoints -------------------------------------------------------------------------------

    def slot(self, name: str) -> int:
        s = self._slots.get(name)
        if s is None:
            with self._lock:
                s = self._slots.get(name)
                if s is None:
                    s = self._free.pop() if self._free else len(self._slots) + len(self._free)
                    self._slots[name] = s
                    self.engine[s] = {}
        return s

    def slot_of(self, name: str) -> int | None:
        return self._slots.get(name)

    def drop_endpoint(self, name: str) -> None:
        """Forget an endpoint (ingestion thread): its entries, then its slot for reuse."""
        s = self._slots.get(name)
        if s is None:
            return
        self.clear(s)
        self._clear_speculative(s)
        with self._lock:
            del self._slots[name]
            self.engine.pop(s, None)
            self._free.append(s)

    # -- events (ingestion thread) ---------------------------------------------------------------

    def apply(self, slot: int, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self.store(slot, ev)
            elif isinstance(ev, BlockRemoved):
                self.remove(slot, ev.hashes, ev.medium)
            elif isinstance(ev, AllBlocksCleared):
                self.clear(slot)

    def store(self, slot: int, ev: BlockStored) -> None:
        bs = self.keys.block_size
        if ev.block_size % bs:
            self.skipped["block-size"] += 1  # engine blocks smaller than ours, or not a multiple
            return
        engine = self.engine.get(slot)
        if engine is None:
            return
        if ev.parent is None:
            parent = self.keys.root(ev.lora, ev.salt)
        else:
            found = engine.get(ev.parent)
            if found is None:
                self.skipped["orphan"] += 1  # its parent was never seen (joined mid-stream, lost events)
                return
            parent = found[-1] if isinstance(found, tuple) else found
        per = ev.block_size // bs
        n = min(len(ev.hashes), len(ev.tokens) // ev.block_size)
        chain = self.keys.chain(ev.tokens, parent, n * per)
        media = self.media.get(ev.medium)
        if media is None:
            media = self.media.setdefault(ev.medium, {})
        if self.max_keys is not None:
            room = self.max_keys - self.size()
            if room < len(chain):
                fit = 0
                for k in chain:  # keys already indexed take no room; the chain's head is kept (matches need it)
                    if k not in media:
                        if room <= 0:
                            break
                        room -= 1
                    fit += 1
                if fit < len(chain):
                    self.skipped["index-full"] += 1
                    n = fit // per
                    chain = chain[: n * per]
        bit = 1 << slot
        for k in chain:
            media[k] = media.get(k, 0) | bit
        if per == 1:
            for h, k in zip(ev.hashes, chain, strict=False):
                engine[h] = k
        else:
            for i, h in enumerate(ev.hashes[:n]):
                engine[h] = tuple(chain[i * per: (i + 1) * per])

    def remove(self, slot: int, hashes: Iterable[int], medium: str = "gpu") -> None:
        engine = self.engine.get(slot)
        media = self.media.get(medium)
        if engine is None or media is None:
            return
        keep = ~(1 << slot)
        for h in hashes:
            found = engine.pop(h, None)
            if found is None:
                continue
            for k in found if isinstance(found, tuple) else (found,):
                m = media.get(k, 0) & keep
                if m:
                    media[k] = m
                else:
                    media.pop(k, None)

    def clear(self, slot: int) -> None:
        """AllBlocksCleared (or the endpoint left): every block it holds, in every medium."""
        engine = self.engine.get(slot)
        if not engine:
            return
        keep = ~(1 << slot)
        for media in list(self.media.values()):
            for found in engine.values():
                for k in found if isinstance(found, tuple) else (found,):
                    m = media.get(k, 0) & keep
                    if m:
                        media[k] = m
                    else:
                        media.pop(k, None)
        engine.clear()

    # -- speculative entries (request path) --------------------------------------------------------

    def speculate(self, name: str, keys: list[int], now: float | None = None) -> None:
        if self.ttl <= 0 or not keys:
            return
        now = time.monotonic() if now is None else now
        self.expire(now)
        slot = self.slot(name)
        bit = 1 << slot
        spec = self.speculative
        for k in keys:
            spec[k] = spec.get(k, 0) | bit
        self._spec_expiry.append((now + self.ttl, slot, keys))

    def expire(self, now: float | None = None) -> None:
        q = self._spec_expiry
        if not q:
            return
        now = time.monotonic() if now is None else now
        spec = self.speculative
        while q and q[0][0] <= now:
            _, slot, keys = q.popleft()
            keep = ~(1 << slot)
            for k in keys:
                m = spec.get(k, 0) & keep
                if m:
                    spec[k] = m
                else:
                    spec.pop(k, None)

    def _clear_speculative(self, slot: int) -> None:
        keep = ~(1 << slot)
        for k, m in list(self.speculative.items()):
            if m & ~keep:
                if m & keep:
                    self.speculative[k] = m & keep
                else:
                    self.speculative.pop(k, None)

    # -- lookup (request path) ---------------------------------------------------------------------

    def match(self, keys: Sequence[int], slots: dict[int, str]) -> dict[str, int]:
        """Per endpoint (slot -> name), how many of ``keys`` it holds from the first one on (any medium,
        confirmed or speculative)."""
        out = dict.fromkeys(slots.values(), 0)
        active = 0
        for s in slots:
            active |= 1 << s
        if not keys or not active:
            return out
        self.expire()
        if self.weights is not None:
            return self._match_weighted(keys, slots, active)
        dicts = [d for d in self.media.values() if d]
        if self.speculative:
            dicts.append(self.speculative)
        n = 0
        for k in keys:
            m = 0
            for d in dicts:
                m |= d.get(k, 0)
            held = m & active
            if held != active:
                gone = active & ~held
                for s, name in slots.items():
                    if gone >> s & 1:
                        out[name] = n
                active = held
                if not active:
                    return out
            n += 1
        for s, name in slots.items():
            if active >> s & 1:
                out[name] = n
        return out

    def held_run(self, keys: Sequence[int]) -> int:
        """How many of ``keys``, from the first on, some endpoint holds (any medium, confirmed or speculative):
        no endpoint's match can go further."""
        self.expire()
        dicts = [d for d in list(self.media.values()) if d]
        if self.speculative:
            dicts.append(self.speculative)
        for i, k in enumerate(keys):
            for d in dicts:
                if k in d:
                    break
            else:
                return i
        return len(keys)

    def _match_weighted(self, keys: Sequence[int], slots: dict[int, str], active: int) -> dict[str, int]:
        """``match`` with tier weights: per endpoint, the sum over its leading run of blocks of the highest
        weight among the media holding each (speculative entries weigh as "gpu")."""
        w = self.weights or {}
        weighted = [(d, w.get(medium, 1.0)) for medium, d in list(self.media.items()) if d]
        if self.speculative:
            weighted.append((self.speculative, w.get("gpu", 1.0)))
        score = dict.fromkeys(slots, 0.0)
        for k in keys:
            best: dict[int, float] = {}
            held = 0
            for d, weight in weighted:
                m = d.get(k, 0) & active
                if not m:
                    continue
                held |= m
                for s in slots:
                    if m >> s & 1 and weight > best.get(s, -1.0):
                        best[s] = weight
            for s, weight in best.items():
                score[s] += weight
            active = held
            if not active:
                break
        return {name: int(score[s] + 1e-9) for s, name in slots.items()}

    def size(self) -> int:
        return sum(len(d) for d in list(self.media.values()))
