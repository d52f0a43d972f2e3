"""The approximate index: per endpoint, the block hashes EPP sent there; per request, its hashes and matches.

One LRU of block hashes per endpoint (capacity ``lruCapacityPerServer``, or with ``autoTune`` the endpoint's
KV capacity ``num_gpu_blocks * block_size / B`` when scraped). A pick inserts the request's blocks in *reverse*
order, so that, like vLLM (which frees a request's blocks tail first), an endpoint loses a prompt's tail before
its head. Every insertion carries all earlier blocks of the chain, so an endpoint holding block ``i`` holds
blocks ``0..i-1``: the match length is found by binary search (O(log n) lookups per endpoint instead of GIE's
walk). Entries are stamped for the ``cached_tokens`` feedback (plugins/scorers/prefix/producer.py): an entry
older than the endpoint's *horizon* no longer matches. An endpoint whose server restarted (seen in its metrics,
``epp.datalayer.restarts``) is emptied at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from epp.plugin import AnswerCollector

_NO_HORIZON = 1 << 62


@dataclass(slots=True)
class _Credit:
    endpoint: str
    stamp: int
    credited: int  # blocks credited at pick time whose inserting requests had completed
    seq: int  # the endpoint's insertion count at pick time
    stamps: list[int]  # the stamp of each block present at pick time, from block 0

    def age(self, block: int) -> int:
        """Blocks inserted on the endpoint, as of the pick, since block ``block`` of the prompt was."""
        return self.seq - self.stamps[block]


@dataclass(slots=True)
class PrefixState:
    """What the producer knows about one request: its block hashes and, per endpoint, the match."""

    hashes: list[int]
    block_tokens: int
    covered_tokens: int  # tokens (estimated for character blocks) the hashes cover
    prompt_tokens: int  # tokens (estimated) of the whole prompt
    kind: str  # "ids" | "tokenizer" | "chars"
    unit: float = 0.0  # server tokens per block: block_tokens, or for character blocks the learned equivalent
    matches: dict[str, int] = field(default_factory=dict)  # endpoint name -> matched blocks
    credit: _Credit | None = None
    stamps: list[tuple[str, int]] = field(default_factory=list)  # (endpoint, stamp) inserted, to release
    total_blocks: int = 0  # the prompt's blocks when ``hashes`` stop short of them (precise: untokenized text)
    answer: AnswerCollector | None = None  # a conversation's answer, collected for the next turn's blocks

    def __bool__(self) -> bool:
        return bool(self.hashes)

    @property
    def blocks(self) -> int:
        """The prompt's blocks (what a match is a fraction of)."""
        return max(self.total_blocks, len(self.hashes))

    def matched_tokens(self, blocks: int) -> int:
        return min(int(blocks * (self.unit or self.block_tokens)), self.covered_tokens)

    @property
    def hit_ratio(self) -> float:
        """Best match over the endpoints matched so far, as a fraction of the request's blocks."""
        if not self.hashes or not self.matches:
            return 0.0
        return max(self.matches.values()) / self.blocks


class _Server:
    """One endpoint's index: block hash -> stamp, least recently inserted first."""

    __slots__ = ("born", "horizon", "inflight", "lru", "seq", "suspect")

    def __init__(self) -> None:
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.seq = 0  # blocks inserted so far; a stamp is the value of seq right after an insertion
        self.inflight: set[int] = set()  # stamps of insertions whose request has not completed
        self.horizon = _NO_HORIZON  # entries this old (in blocks inserted since) or older no longer match
        self.suspect: list[int] = []  # ages of recent misses not yet confirmed by another (MISSES_TO_FORGET)
        self.born = 0  # seq when the endpoint's server (last) started: stamps up to it belong to a dead process

    def forget(self) -> None:
        """The server restarted: it holds nothing. ``seq`` goes on, so that a stamp taken before stays told apart
        (``born``): the feedback of a request credited against the old cache says nothing about the new one."""
        self.lru.clear()
        self.inflight.clear()
        self.horizon = _NO_HORIZON
        self.suspect.clear()
        self.born = self.seq

    def match(self, hashes: list[int]) -> int:
        lru = self.lru
        if not lru:
            return 0
        get = lru.get
        seq, horizon = self.seq, self.horizon
        s = get(hashes[0])
        if s is None or seq - s >= horizon:
            return 0
        n = len(hashes)
        s = get(hashes[-1])
        if s is not None and seq - s < horizon:
            return n
        lo, hi = 1, n - 1  # hashes[lo-1] held, hashes[hi] not held
        while lo < hi:
            mid = (lo + hi) >> 1
            s = get(hashes[mid])
            if s is not None and seq - s < horizon:
                lo = mid + 1
            else:
                hi = mid
        return lo
