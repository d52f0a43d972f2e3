"""``approx-prefix-cache-producer``: hashes prompts into blocks, matches them against the index, updates the
index at each pick and corrects it from the ``cached_tokens`` the model server reports.

Hashing. Blocks are ``B`` tokens: the request's token ids when it carries them (``/v1/completions`` with
ids, vLLM ``/inference/v1/generate``), the ids of a configured ``tokenizer`` (a HF ``tokenizer.json``),
else ``4 * B`` bytes of the prompt text (GIE's 4-characters-per-token estimate). ``B`` is
``blockSizeTokens`` or, with ``autoTune`` and an endpoint reporting its KV block size, the smallest
multiple of that size that is >= ``blockSizeTokens``. Block ``i`` hashes as
``h_i = xxh64(block_i, seed=h_{i-1})`` with ``h_{-1} = xxh64(target model \\0 cache_salt)``, so equal
hashes mean equal prefixes; a trailing partial block is hashed too, a prompt shorter than one block has
no hash. At most ``maxPrefixBlocksToMatch`` blocks (or ``maxPrefixTokensToMatch / B`` when that is set).

Feedback from ``cached_tokens`` (``cachedTokensFeedback``, default on). An entry is stamped with the
number of blocks inserted on that endpoint when it was (re)inserted; its *age* is how many blocks were
inserted after it. When a response reports fewer cached tokens than the blocks EPP credited the
endpoint with (beyond a tolerance: one block, and 1.5x for character blocks, 1.25x with a tokenizer,
whose counts are estimates), the endpoint evidently evicts sooner than the index assumes: its
*horizon* drops to the age of the first block it missed, and entries older than the horizon no longer
match. A response reporting *more* cached tokens than credited raises the horizon back to the age of
the oldest block it proved present. Credit only counts entries whose inserting request had completed
(two identical prompts sent together both miss, and that says nothing about eviction). The request's
own blocks stay indexed: the model server has just computed and cached them.

Completion. The server frees a request's blocks when it ends, tail first: the prompt is inserted again then,
as its most recently used entry. In a conversation (a chat or Anthropic request that resends an earlier
answer) the server holds the answer too, and the next turn resends it: what is inserted then is the prompt
continued by the answer (``continuation_text``), so the next turn's match counts the answer's blocks. A one-off
question's answer is never resent, so it is not inserted. (Filler entries standing for every answer's blocks
helped long conversations but hurt mixed APIs, where the index already counts one prefix once per API's
rendering and so fills faster than the server: bench/README.md §1b.)

Restarts. Misses find an endpoint that restarted with an empty cache only after ``MISSES_TO_FORGET`` of them,
each a cold prefill. The scraper sees the restart itself (a counter going backwards, a new process start time:
``epp.datalayer.restarts``) and the endpoint's entries are dropped at that scrape; a response to a request
credited before then teaches nothing.
"""

from __future__ import annotations

import contextlib
import math
from array import array
from collections.abc import Callable, Sequence

import xxhash

from epp.observability.audit import TOKEN_ERROR_BUCKETS, PredictionAudit
from epp.plugin import (
    Endpoint,
    InferenceRequest,
    RequestObserver,
    ResponseInfo,
    SchedulingResult,
    answer_collector,
    check_bool,
    check_int,
    check_str,
    continuation_text,
    register_plugin,
)
from epp_plugins.scorers.prefix.index import _NO_HORIZON, PrefixState, _Credit, _Server
from epp_plugins.scorers.prefix.tokenizer import CHARS_PER_TOKEN, ChunkedTokenizer

PREFILL_PROFILE = "prefill"
# Parameter defaults, also precise-prefix-cache-producer's (plugins/scorers/README.md quotes them).
DEFAULT_BLOCK_SIZE_TOKENS = 16  # blockSizeTokens (GIE's)
DEFAULT_MAX_PREFIX_BLOCKS = 2048  # maxPrefixBlocksToMatch (llm-d's; GIE's 256 stops at 4096 tokens)
DEFAULT_LRU_CAPACITY_PER_SERVER = 31250  # lruCapacityPerServer (GIE's)
# How far a reported cached-token count may be off from our block count, per kind of block ("chars" once the
# model's characters per token is learned; before that "chars-prior").
_SLACK = {"ids": 1.0, "tokenizer": 1.25, "chars": 1.25, "chars-prior": 1.5}
LEARNED_AFTER = 3  # responses before a model's learned characters per token replaces the prior in feedback
MISSES_TO_FORGET = 2  # consistent misses before an endpoint's horizon drops (one can be a race, not eviction)


@register_plugin("approx-prefix-cache-producer")
class ApproxPrefixCacheProducer(RequestObserver):
    """Hashes prompts, keeps the per-endpoint block index, matches requests against it."""

    uses_response_body = True  # a conversation's answer: the next turn's blocks (without bodies: not counted)

    def __init__(self, block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
                 max_prefix_blocks_to_match: int = DEFAULT_MAX_PREFIX_BLOCKS, max_prefix_tokens_to_match: int = 0,
                 lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
                 auto_tune: bool = True, tokenizer: str | None = None, cached_tokens_feedback: bool = True) -> None:
        self.block_tokens = check_int(block_size_tokens, "blockSizeTokens", 1, 1 << 20)
        self.max_blocks = check_int(max_prefix_blocks_to_match, "maxPrefixBlocksToMatch", 1, 1 << 20)
        self.max_tokens = check_int(max_prefix_tokens_to_match, "maxPrefixTokensToMatch", 0, 1 << 30)
        self.capacity = check_int(lru_capacity_per_server, "lruCapacityPerServer", 1)
        self.auto_tune = check_bool(auto_tune, "autoTune")
        self.feedback = check_bool(cached_tokens_feedback, "cachedTokensFeedback")
        self.tokenizer = ChunkedTokenizer(check_str(tokenizer, "tokenizer")) if tokenizer is not None else None
        self._servers: dict[str, _Server] = {}
        self._key = ("approx-prefix-cache", id(self))
        self.stats = {"misses": 0, "surprise_hits": 0}
        self.audit = PredictionAudit("tokens", TOKEN_ERROR_BUCKETS, threshold=16)
        # (producer name, endpoint name, block hashes, tokens per block) of every pick, for a shared store
        self.share: Callable[[str, str, Sequence[int], float], None] | None = None

    def start(self) -> None:
        if self.handle and self.handle.pool:
            self.handle.pool.add_listener(self._forget_removed)
            self.handle.pool.add_restart_listener(self._forget_restarted)

    def stop(self) -> None:
        if self.handle and self.handle.pool:
            self.handle.pool.remove_listener(self._forget_removed)
            self.handle.pool.remove_restart_listener(self._forget_restarted)

    def _forget_removed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:
            self._servers.pop(e.name, None)

    def _forget_restarted(self, endpoint: Endpoint, last_seen: float) -> None:
        """Its server restarted (``epp.datalayer.restarts``): its cache is empty now, not after misses."""
        srv = self._servers.get(endpoint.name)
        if srv is not None:
            srv.forget()

    # -- sizes ---------------------------------------------------------------------------------

    def block_tokens_for(self, endpoints: Sequence[Endpoint]) -> int:
        if self.auto_tune:
            for e in endpoints:
                bs = e.metrics.block_size
                if bs and bs > 0:
                    return bs * -(-self.block_tokens // bs)
        return self.block_tokens

    def _capacity(self, endpoint: Endpoint, block_tokens: float) -> int:
        if self.auto_tune:
            blocks = endpoint.metrics.num_gpu_blocks
            if blocks and blocks > 0:
                bs = endpoint.metrics.block_size
                return max(1, int(blocks * bs // block_tokens)) if bs and bs > 0 else blocks
        return self.capacity

    def indexer_size(self) -> int:
        return sum(len(s.lru) for s in list(self._servers.values()))  # list: /metrics renders off the loop

    # -- hashing and matching --------------------------------------------------------------------

    def state(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> PrefixState:
        """The request's hashes (computed once per request, whichever plugin asks first)."""
        st = request.attributes.get(self._key)
        if st is None:
            st = self._hash(request, self.block_tokens_for(endpoints))
            request.attributes[self._key] = st
        return st

    def _chars_per_token(self, request: InferenceRequest) -> float:
        pool = self.handle.pool if self.handle is not None else None
        model = request.target_model or request.model
        return pool.tokens.chars_per_token(model) if pool is not None else float(CHARS_PER_TOKEN)

    def _slack(self, st: PrefixState, request: InferenceRequest) -> float:
        if st.kind != "chars":
            return _SLACK[st.kind]
        pool = self.handle.pool if self.handle is not None else None
        learned = pool is not None and pool.tokens.samples(request.target_model or request.model) >= LEARNED_AFTER
        return _SLACK["chars" if learned else "chars-prior"]

    def _hash(self, request: InferenceRequest, block: int, text: str | None = None) -> PrefixState:
        """The prompt's blocks, or those of ``text`` (a continuation of the prompt) hashed the same way."""
        unit = float(block)
        max_blocks = max(1, self.max_tokens // block) if self.max_tokens else self.max_blocks
        max_tokens = block * max_blocks
        body = request.body
        ids = body.prompt_token_ids if text is None else None
        if ids is not None:
            head = ids[:max_tokens]
            try:
                data = array("I", head).tobytes()
                width = 4
            except (OverflowError, TypeError, ValueError):
                data = array("q", [int(i) for i in head]).tobytes()
                width = 8
            kind, covered, prompt = "ids", len(head), len(ids)
            step = block * width
        else:
            if text is None:
                text = body.prompt_text or ""
            if self.tokenizer is not None and text:
                data, prompt = self.tokenizer.encode(text, max_tokens)
                kind, covered, step = "tokenizer", len(data) // 4, block * 4
            else:
                # Blocks of a fixed 4 * B characters (hashes must not move as the ratio is learned); counts in
                # the server's tokens through the learned characters per token.
                step = block * CHARS_PER_TOKEN
                data = text[: step * max_blocks].encode("utf-8", "surrogatepass")[: step * max_blocks]
                cpt = self._chars_per_token(request)
                kind, prompt, unit = "chars", int(len(text) / cpt), step / cpt
                covered = math.ceil(len(data) / cpt)
        if len(data) < step:
            return PrefixState([], block, 0, prompt, kind, unit)
        seed = xxhash.xxh64_intdigest(f"{request.target_model or body.model}\0{body.cache_salt or ''}".encode())
        h = xxhash.xxh64_intdigest
        mv = memoryview(data)
        hashes = []
        append = hashes.append
        for off in range(0, len(data), step):
            seed = h(mv[off: off + step], seed)
            append(seed)
        return PrefixState(hashes, block, covered, prompt, kind, unit)

    def match(self, state: PrefixState, endpoint: Endpoint) -> int:
        """Blocks of the request's prefix the endpoint holds (memoised per request)."""
        m = state.matches.get(endpoint.name)
        if m is None:
            srv = self._servers.get(endpoint.name)
            m = srv.match(state.hashes) if srv is not None and state.hashes else 0
            state.matches[endpoint.name] = m
        return m

    def match_all(self, state: PrefixState, endpoints: Sequence[Endpoint]) -> list[int]:
        if not state.hashes:
            return [0] * len(endpoints)
        memo = state.matches
        servers = self._servers
        hashes = state.hashes
        first = hashes[0]
        out = []
        for e in endpoints:
            name = e.name
            m = memo.get(name)
            if m is None:
                srv = servers.get(name)
                # Most endpoints do not hold the first block: one lookup, no call.
                m = 0 if srv is None or first not in srv.lru else srv.match(hashes)
                memo[name] = m
            out.append(m)
        return out

    # -- index updates ---------------------------------------------------------------------------

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        st: PrefixState | None = request.attributes.get(self._key)
        if not st or not result.endpoints:
            return
        self._insert(st, result.endpoints[0], credit=True)
        if st.kind != "ids":
            st.answer = answer_collector(request)
        prefill = result.profile_results.get(PREFILL_PROFILE)
        if prefill and prefill.endpoints and result.primary_profile != PREFILL_PROFILE:
            target = prefill.endpoints[0]
            if target is not result.endpoints[0]:
                self._insert(st, target, credit=False)

    def _insert(self, st: PrefixState, endpoint: Endpoint, credit: bool) -> None:
        hashes = st.hashes
        srv = self._servers.get(endpoint.name)
        if srv is None:
            srv = self._servers[endpoint.name] = _Server()
        lru = srv.lru
        if credit and self.feedback:
            matched = self.match(st, endpoint)
            seq, inflight = srv.seq, srv.inflight
            stamps = list(map(lru.get, hashes))  # in C: a 58k-token prompt has thousands of blocks
            with contextlib.suppress(ValueError):
                del stamps[stamps.index(None):]  # the blocks present, from block 0
            pending_at = None
            if not inflight.isdisjoint(stamps):
                pending_at = next(i for i, s in enumerate(stamps) if s in inflight)
            credited = min(matched if pending_at is None else min(matched, pending_at), len(stamps))
        block_tokens = st.unit or st.block_tokens
        stamp = self._index(srv, endpoint, hashes, block_tokens)
        if self.share is not None:  # other replicas learn the pick (epp.state)
            self.share(self.name, endpoint.name, hashes, block_tokens)
        srv.inflight.add(stamp)
        st.stamps.append((endpoint.name, stamp))
        if credit and self.feedback:
            st.credit = _Credit(endpoint.name, stamp, credited, seq, stamps)

    def _index(self, srv: _Server, endpoint: Endpoint, hashes: Sequence[int], block_tokens: float) -> int:
        """Insert a chain's blocks tail first (see plugins/scorers/prefix/index.py); the insertion's stamp."""
        lru = srv.lru
        stamp = srv.seq + len(hashes)
        srv.seq = stamp
        move = lru.move_to_end
        for h in reversed(hashes):
            lru[h] = stamp
            move(h)
        cap = self._capacity(endpoint, block_tokens)
        while len(lru) > cap:
            lru.popitem(last=False)
        return stamp

    def insert_remote(self, endpoint: Endpoint, hashes: Sequence[int], block_tokens: float) -> None:
        """Blocks another replica sent to ``endpoint`` (epp.state): indexed as a pick of ours, never credited."""
        srv = self._servers.get(endpoint.name)
        if srv is None:
            srv = self._servers[endpoint.name] = _Server()
        self._index(srv, endpoint, hashes, block_tokens)

    def on_response_body(self, request: InferenceRequest, endpoint: Endpoint, chunk: bytes,
                         end_of_stream: bool) -> None:
        st: PrefixState | None = request.attributes.get(self._key)
        if st is not None and st.answer is not None:
            st.answer.feed(chunk)

    def on_response_complete(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        st: PrefixState | None = request.attributes.get(self._key)
        if st is None:
            return
        freed = None  # this endpoint's index, when it got the prompt's blocks at the pick since its server started
        for name, stamp in st.stamps:
            srv = self._servers.get(name)
            if srv is not None:
                srv.inflight.discard(stamp)
                if name == endpoint.name and stamp > srv.born:
                    freed = srv
        st.stamps = []
        here = _answered_by(endpoint, response)
        if here:
            self._audit(st, endpoint, response)
            if freed is not None:
                # The server frees a request's blocks when it ends, head last: the prompt is its most recently
                # used entry then, not at the pick (a long answer's prompt outlives prompts picked after it).
                held, block_tokens = self._held(request, st, response), st.unit or st.block_tokens
                self._index(freed, endpoint, held, block_tokens)
                if self.share is not None:  # other replicas learn the server's order, and the answer, too
                    self.share(self.name, endpoint.name, held, block_tokens)
        credit, st.credit = st.credit, None
        if credit is None or credit.endpoint != endpoint.name or not response.completed or not here:
            return  # (not here: a fallback served it, the usage says nothing about the endpoint we credited)
        usage = response.usage
        if usage is None or usage.cached_tokens is None:
            return
        srv = self._servers.get(credit.endpoint)
        if srv is not None and credit.stamp > srv.born:  # credited against a cache that a restart has since emptied
            self.apply_feedback(srv, credit, usage.cached_tokens, st.unit or st.block_tokens, self._slack(st, request))

    def _held(self, request: InferenceRequest, st: PrefixState, response: ResponseInfo) -> list[int]:
        """The blocks the server holds once the request ended: its prompt's, continued by a conversation's
        answer (as the next turn will resend it) when the response completed with one."""
        answer, st.answer = st.answer, None
        if answer is None or not response.completed:
            return st.hashes
        text = continuation_text(request, answer.text())
        if text is None:
            return st.hashes
        held = self._hash(request, st.block_tokens, text)
        return held.hashes if held.kind == st.kind and len(held.hashes) >= len(st.hashes) else st.hashes

    def _audit(self, st: PrefixState, endpoint: Endpoint, response: ResponseInfo) -> None:
        """The match predicted at the pick against the cached tokens ``endpoint`` reported (it answered), in its
        terms: a server never reuses a prompt's last token and caches whole blocks of its own size."""
        usage = response.usage
        if usage is None or usage.cached_tokens is None:
            return
        engine_block = endpoint.metrics.block_size or 16
        predicted = st.matched_tokens(st.matches.get(endpoint.name, 0)) if st.hashes else 0
        if usage.prompt_tokens:
            predicted = min(predicted, usage.prompt_tokens - 1)
        predicted -= predicted % engine_block
        self.audit.record(max(0, predicted), usage.cached_tokens)
        self.audit.threshold = engine_block

    def prediction_audits(self) -> dict[str, PredictionAudit]:
        return {"cached_tokens": self.audit}

    def apply_feedback(self, srv: _Server, credit: _Credit, cached_tokens: int, block_tokens: float,
                       slack: float) -> None:
        generous = int(cached_tokens * slack / block_tokens)  # at most this many of our blocks were cached
        if credit.credited >= generous + 2:
            # Missed: block generous+1 was credited but not cached. Entries that old are gone -- once a second
            # miss agrees: a single one can be a race (the server evicted and recomputed under us, or another
            # request's blocks were still being written), and forgetting costs every prefix on the endpoint.
            srv.suspect.append(credit.age(generous + 1))
            if len(srv.suspect) >= MISSES_TO_FORGET:
                age = max(srv.suspect)
                srv.suspect.clear()
                if age < srv.horizon:
                    srv.horizon = age
                    self.stats["misses"] += 1
            return
        if credit.credited:
            srv.suspect.clear()  # a credited hit confirmed: the earlier miss was not eviction
        sure = int(cached_tokens / slack / block_tokens)  # at least this many of our blocks were cached
        present = len(credit.stamps)
        if sure > credit.credited + 1 and present > credit.credited:
            # More was cached than credited: blocks that old are still there.
            proven = range(credit.credited, min(sure, present))
            if proven:
                oldest = max(map(credit.age, proven)) + 1
                if oldest > srv.horizon:
                    srv.horizon = oldest
                    self.stats["surprise_hits"] += 1

    def prefix_producer(self) -> ApproxPrefixCacheProducer:
        return self

    def horizon(self, endpoint_name: str) -> int | None:
        """The endpoint's learned horizon (blocks), None when no miss lowered it."""
        srv = self._servers.get(endpoint_name)
        return None if srv is None or srv.horizon >= _NO_HORIZON else srv.horizon


def _answered_by(endpoint: Endpoint, response: ResponseInfo) -> bool:
    """A success from ``endpoint`` itself (not a fallback Envoy chose): what it reports is about its cache."""
    return 200 <= response.status < 300 and (not response.served_endpoint
                                             or response.served_endpoint == endpoint.hostport)
