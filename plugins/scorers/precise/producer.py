"""``precise-prefix-cache-producer``: the prefix match from what the endpoints report they hold (vLLM KV events).

It is an ``approx-prefix-cache-producer`` whose block keys come from the engine's own token ids and whose match,
for every endpoint with a live event stream, comes from the events instead of from EPP's guesses. So every
plugin that reads a prefix match (``prefix-cache-scorer``, ``predicted-latency-scorer``, the affinity filter,
no-hit-lru) reads this one the same way, and endpoints without events (none configured, the stream stopped, a
request EPP cannot tokenize) fall back to the approximate index, which keeps learning from every pick.

Parameters (llm-d's names). A parameter is accepted only when EPP does what it asks; the others are refused at
load with the reason and what to use instead (``PluginConfigError``).

* ``tokenProcessorConfig``: ``blockSizeTokens`` (16; ``blockSize`` accepted), ``hashSeed`` (""). Refused:
  ``hashAlgorithm`` (keys are EPP's own on both sides, see ``epp_plugins.scorers.precise.index``).
* ``kvEventsConfig``: ``zmqEndpoint`` (centralized mode: bind a SUB there, pods connect and name themselves in
  the topic ``kv@<pod>@<model>``), ``topicFilter`` ("" -- vLLM's default topic is empty), ``engineType`` (``vllm``
  | ``sglang``: the events' schema, see ``events``), ``discoverPods`` (true: subscribe to the endpoints of the
  pool), ``podDiscoveryConfig`` {``socketPort`` 5557, ``replaySocketPort`` 0 = none (both offset by the
  endpoint's data-parallel rank, as vLLM binds them), ``podLabelSelector`` (only endpoints whose labels match get
  a subscriber; "" = all), ``podNamespace`` (only endpoints of pods in that namespace)}, ``maxEventsPerSecond``
  (per endpoint, 100000), ``staleAfter`` ("10s": an endpoint that was sent uncached blocks this long ago and
  published nothing since is served by the approximate index), ``concurrency`` (1 only: one ingestion thread).
  An endpoint's own publisher (``kvEventsPort`` / ``kvEventsEndpoint`` / ``kvEventsReplayPort`` in the static
  endpoints file; on Kubernetes the ``epp.io/kv-events-*`` pod annotations or the container ports named
  ``kv-events`` / ``kv-replay``) wins over the pool defaults.
* ``indexerConfig``: ``kvBlockIndexConfig.inMemoryConfig.size`` (keys held, 1e8), ``kvCacheBackendConfigs`` (or
  ``backendConfigs``) [{``name``, ``weight``}] (how much a block in that medium counts; unset: every medium 1),
  ``prefixStoreConfig`` {``cacheSize`` x ``blockSize``: characters of the local tokenizer's cache},
  ``tokenProcessorConfig`` (the older place of the top-level one), ``kvBlockIndexConfig.enableMetrics: true``
  and ``metricsLoggingInterval: 0`` (what EPP does). Refused: ``tokenizersPoolConfig``, ``podCacheSize``,
  ``costAwareMemoryConfig``, ``redisConfig``, ``valkeyConfig``, other ``enableMetrics`` /
  ``metricsLoggingInterval`` values.
* ``speculativeIndexing`` (false), ``speculativeTTL`` ("2s"): index a pick's blocks until its events arrive.
* ``tokenizer``: a model directory (``tokenizer.json`` + ``tokenizer_config.json``) or a ``tokenizer.json``;
  ``chatTemplate``: a template (file or text) overriding the directory's. Without a tokenizer the pods render
  (``/v1/chat/completions/render``, ``/v1/completions/render``, ``/tokenize``), ``renderTimeout`` ("2s"),
  ``renderCacheSize`` (4096).
* ``maxPrefixBlocksToMatch``, ``lruCapacityPerServer``, ``cachedTokensFeedback``: for the approximate fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool
from epp.scheduling.plugins import RequestPreparer, SchedulingResult
from epp.scheduling.registry import PluginConfigError, register_plugin
from epp_plugins.scorers.common import check_bool, check_duration, check_float, check_int, check_mapping, check_str
from epp_plugins.scorers.precise.events import ENGINES, BlockStored, Event
from epp_plugins.scorers.precise.index import BlockIndex, BlockKeys
from epp_plugins.scorers.precise.selector import parse_label_selector
from epp_plugins.scorers.precise.tokenize import LocalTokenizer, PodRenderer
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer, PrefixState
from epp_plugins.scorers.prefix.producer import (
    DEFAULT_BLOCK_SIZE_TOKENS,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_PREFIX_BLOCKS,
)

log = logging.getLogger(__name__)
MAX_PENDING = 10_000  # picked prompts whose untokenized text may still be speculated
OFFLOAD_CHARS = 8192  # new prompt text worth a worker thread (~3 ms of encoding; the hop costs ~0.1 ms)

DEFAULT_SOCKET_PORT = 5557  # vLLM's default publisher port
DEFAULT_INDEX_KEYS = 100_000_000  # llm-d's inMemoryConfig.size
_TOKEN_KEYS = ("blockSizeTokens", "blockSize", "hashSeed", "hashAlgorithm")
_EVENT_KEYS = ("zmqEndpoint", "topicFilter", "concurrency", "engineType", "discoverPods", "podDiscoveryConfig",
               "maxEventsPerSecond", "staleAfter")
_DISCOVERY_KEYS = ("podLabelSelector", "podNamespace", "socketPort", "replaySocketPort")
_INDEXER_KEYS = ("tokenProcessorConfig", "kvBlockIndexConfig", "kvCacheBackendConfigs", "backendConfigs",
                 "prefixStoreConfig", "tokenizersPoolConfig")
_BLOCK_INDEX_KEYS = ("inMemoryConfig", "costAwareMemoryConfig", "redisConfig", "valkeyConfig", "enableMetrics",
                     "metricsLoggingInterval")
_REFUSED = {  # llm-d parameters EPP has no equivalent for: why, and what to do instead
    "tokenProcessorConfig.hashAlgorithm":
        "EPP computes its own block keys (an XXH64 chain) from token ids, for requests and from the events' "
        "token_ids alike, so no hash algorithm has to match the engine's or llm-d's; remove it (hashSeed still "
        "seeds the keys)",
    "indexerConfig.tokenizersPoolConfig":
        "EPP does not pool or download tokenizers: set `tokenizer` to a model directory (tokenizer.json + "
        "tokenizer_config.json), or leave it unset and the pods render the prompts (renderTimeout, renderCacheSize)",
    "indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize":
        "EPP records every endpoint holding a block (one bit each), there is no per-block limit; remove it",
    "indexerConfig.kvBlockIndexConfig.costAwareMemoryConfig":
        "EPP bounds its index in keys: use kvBlockIndexConfig.inMemoryConfig.size (about 150 bytes a key, "
        "bench/README.md)",
    "indexerConfig.kvBlockIndexConfig.redisConfig":
        "EPP keeps the index in memory in each replica, each subscribing to the endpoints' events itself "
        "(docs/scaling.md); remove it",
    "indexerConfig.kvBlockIndexConfig.valkeyConfig":
        "EPP keeps the index in memory in each replica, each subscribing to the endpoints' events itself "
        "(docs/scaling.md); remove it",
    "indexerConfig.kvBlockIndexConfig.enableMetrics":
        "EPP always exports the index metrics (epp_precise_prefix_*, epp_kv_events_* on /metrics); remove it",
    "indexerConfig.kvBlockIndexConfig.metricsLoggingInterval":
        "EPP does not log the index metrics periodically; scrape /metrics (epp_precise_prefix_*, "
        "epp_kv_events_*); remove it",
    "kvEventsConfig.concurrency":
        "EPP decodes and indexes every endpoint's events on one thread (Python threads would not decode in "
        "parallel; about 50,000 events/s a core, bench/README.md); remove it or set 1 "
        "(maxEventsPerSecond bounds each endpoint)",
}


def _refuse(path: str) -> PluginConfigError:
    return PluginConfigError(f"{path} is not supported: {_REFUSED[path]}")


def _tier_weights(value: Any, name: str) -> dict[str, float]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name} must be a non-empty list of {{name, weight}}, got {value!r}")
    out: dict[str, float] = {}
    for i, item in enumerate(value):
        item = check_mapping(item, f"{name}[{i}]", ("name", "weight"))
        tier = check_str(item.get("name"), f"{name}[{i}].name").lower()  # media are lower-cased (events)
        out[tier] = check_float(item.get("weight", 1.0), f"{name}[{i}].weight", 0.0)
    return out


@dataclass(slots=True)
class PreciseState(PrefixState):
    precise: bool = False  # keys from the engine's token ids (else the approximate producer's hashes)
    rest: _Partial | None = None  # the hashes stop where the text no endpoint could match starts


@dataclass(slots=True)
class _Partial:
    """A prompt's exact leading ids, and the tokens estimated after them (text no endpoint can match)."""

    ids: list[int]
    rest_tokens: int
    pieces: list[str | int]  # the whole prompt, to encode when events make the rest matchable after all
    add_special: bool
    root: int  # the key chain's root
    keys: list[int]  # of ``ids``' full blocks


@register_plugin("precise-prefix-cache-producer")
class PrecisePrefixCacheProducer(ApproxPrefixCacheProducer, RequestPreparer):
    def __init__(self, token_processor_config: Any = None, kv_events_config: Any = None,
                 speculative_indexing: bool = False, speculative_t_t_l: Any = "2s", indexer_config: Any = None,
                 tokenizer: str | None = None, chat_template: str | None = None, render_timeout: Any = "2s",
                 render_cache_size: int = 4096, max_prefix_blocks_to_match: int = DEFAULT_MAX_PREFIX_BLOCKS,
                 lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
                 cached_tokens_feedback: bool = True) -> None:
        ix = check_mapping(indexer_config or {}, "indexerConfig", _INDEXER_KEYS)
        if ix.get("tokenizersPoolConfig") is not None:
            raise _refuse("indexerConfig.tokenizersPoolConfig")
        if ix.get("tokenProcessorConfig") is not None and token_processor_config is not None:
            raise ValueError("tokenProcessorConfig is set twice (at the top and in indexerConfig): keep one")
        tp = check_mapping(token_processor_config or ix.get("tokenProcessorConfig") or {}, "tokenProcessorConfig",
                           _TOKEN_KEYS)
        if "hashAlgorithm" in tp:
            raise _refuse("tokenProcessorConfig.hashAlgorithm")
        block = check_int(tp.get("blockSizeTokens", tp.get("blockSize", DEFAULT_BLOCK_SIZE_TOKENS)), "blockSizeTokens",
                          1, 4096)
        super().__init__(block_size_tokens=block, max_prefix_blocks_to_match=max_prefix_blocks_to_match,
                         lru_capacity_per_server=lru_capacity_per_server, auto_tune=False,
                         cached_tokens_feedback=cached_tokens_feedback)
        ev = check_mapping(kv_events_config or {}, "kvEventsConfig", _EVENT_KEYS)
        disc = check_mapping(ev.get("podDiscoveryConfig") or {}, "podDiscoveryConfig", _DISCOVERY_KEYS)
        self.bind = check_str(ev["zmqEndpoint"], "zmqEndpoint") if ev.get("zmqEndpoint") else None
        topic = ev.get("topicFilter", "")
        self.topic_filter = check_str(topic, "topicFilter") if topic else ""  # "": every topic
        self.engine = check_str(ev.get("engineType", "vllm"), "kvEventsConfig.engineType", ENGINES)
        if ev.get("concurrency") is not None and check_int(ev["concurrency"], "kvEventsConfig.concurrency", 1) != 1:
            raise _refuse("kvEventsConfig.concurrency")
        self.discover = check_bool(ev.get("discoverPods", True), "discoverPods")
        self.socket_port = check_int(disc.get("socketPort", DEFAULT_SOCKET_PORT), "socketPort", 1, 65535)
        self.replay_port = check_int(disc.get("replaySocketPort", 0), "replaySocketPort", 0, 65535)
        self.pod_selector = parse_label_selector(disc.get("podLabelSelector") or "", "podLabelSelector")
        ns = disc.get("podNamespace")
        self.pod_namespace = check_str(ns, "podNamespace") if ns else None
        self.max_rate = check_int(ev.get("maxEventsPerSecond", 100_000), "maxEventsPerSecond", 1)
        self.stale_after = check_duration(ev.get("staleAfter", "10s"), "staleAfter")
        self.speculative = check_bool(speculative_indexing, "speculativeIndexing")
        ttl = check_duration(speculative_t_t_l, "speculativeTTL")  # the registry maps speculativeTTL to this name
        seed = tp.get("hashSeed") or ""
        self.keys = BlockKeys(block, check_str(seed, "hashSeed") if seed else "")
        max_keys, weights = self._index_config(ix)
        self.index = BlockIndex(self.keys, ttl if self.speculative else 0.0, max_keys, weights)
        cache_chars = self._token_cache_chars(ix.get("prefixStoreConfig"), tokenizer)
        self.local = (LocalTokenizer(check_str(tokenizer, "tokenizer"), chat_template, cache_chars or 64 << 20)
                      if tokenizer else None)
        self.renderer = None if self.local else PodRenderer(check_duration(render_timeout, "renderTimeout"),
                                                           check_int(render_cache_size, "renderCacheSize", 1))
        self.prepares = True  # pod rendering, or a local prompt with much new text: tokenized off the loop
        self.adapters: set[str] = set()  # LoRA names seen in events: requests for them use the adapter's root
        self.ingestor: Any = None
        self._pool: EndpointPool | None = None  # the pool followed since start()
        self._subscribed: set[str] = set()  # endpoints given a subscriber (discoverPods, selector, namespace)
        self._expect: dict[str, float] = {}  # endpoint -> first pick since its last frame that should make events
        self.lookups: Counter[str] = Counter()  # "precise" | "fallback" | "untokenized", per endpoint match
        self.fallbacks: Counter[str] = Counter()  # endpoint -> matches served by the approximate index
        self._key = ("precise-prefix-cache", id(self))
        # speculated prompts with untokenized text: last key speculated -> (endpoint, state); expiry order
        self._pending: dict[int, tuple[str, PreciseState]] = {}
        self._pending_expiry: deque[tuple[float, int, PreciseState]] = deque()

    @staticmethod
    def _index_config(ix: dict[str, Any]) -> tuple[int, dict[str, float] | None]:
        """indexerConfig -> (keys the index may hold, tier weights or None)."""
        kb = check_mapping(ix.get("kvBlockIndexConfig") or {}, "kvBlockIndexConfig", _BLOCK_INDEX_KEYS)
        for refused in ("costAwareMemoryConfig", "redisConfig", "valkeyConfig"):
            if kb.get(refused) is not None:
                raise _refuse(f"indexerConfig.kvBlockIndexConfig.{refused}")
        if "enableMetrics" in kb and not check_bool(kb["enableMetrics"], "enableMetrics"):
            raise _refuse("indexerConfig.kvBlockIndexConfig.enableMetrics")
        if kb.get("metricsLoggingInterval") and check_duration(kb["metricsLoggingInterval"],
                                                                "metricsLoggingInterval") > 0:
            raise _refuse("indexerConfig.kvBlockIndexConfig.metricsLoggingInterval")
        mem = check_mapping(kb.get("inMemoryConfig") or {}, "inMemoryConfig", ("size", "podCacheSize"))
        if mem.get("podCacheSize") is not None:
            raise _refuse("indexerConfig.kvBlockIndexConfig.inMemoryConfig.podCacheSize")
        size = check_int(mem.get("size", DEFAULT_INDEX_KEYS), "inMemoryConfig.size", 1)
        if ix.get("kvCacheBackendConfigs") is not None and ix.get("backendConfigs") is not None:
            raise ValueError("set one of indexerConfig.kvCacheBackendConfigs and backendConfigs, not both")
        tiers = ix.get("kvCacheBackendConfigs", ix.get("backendConfigs"))
        weights = _tier_weights(tiers, "indexerConfig.kvCacheBackendConfigs") if tiers is not None else None
        return size, weights

    @staticmethod
    def _token_cache_chars(store: Any, tokenizer: str | None) -> int | None:
        """llm-d's prefixStoreConfig ({cacheSize} blocks of {blockSize} characters) -> characters of the local
        tokenizer's token cache."""
        if store is None:
            return None
        ps = check_mapping(store, "prefixStoreConfig", ("cacheSize", "blockSize"))
        if not tokenizer:
            raise ValueError("indexerConfig.prefixStoreConfig sizes the token cache of EPP's own tokenizer, which "
                             "needs `tokenizer`; with the pods rendering prompts, size their cache with "
                             "renderCacheSize")
        return (check_int(ps.get("cacheSize", 500_000), "prefixStoreConfig.cacheSize", 1)
                * check_int(ps.get("blockSize", 256), "prefixStoreConfig.blockSize", 1))

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start ingesting (one thread) and follow the pool. Started again when a config reload keeps the plugin:
        the thread and index are kept, the (possibly new) pool followed."""
        super().start()
        if self.ingestor is None:
            from epp_plugins.scorers.precise.subscriber import EventIngestor  # pyzmq only when the plugin is configured

            self.ingestor = EventIngestor(self._apply, self.index.drop_endpoint, bind=self.bind,
                                          resolve_pod=self._resolve_pod, topic_filter=self.topic_filter,
                                          max_frames_per_second=self.max_rate, engine=self.engine)
            self.ingestor.start()
        pool = self.handle.pool if self.handle else None
        if self._pool is not None and self._pool is not pool:
            self._unfollow()
        self._pool = pool
        if pool is not None:
            pool.add_listener(self._follow_pool)
            pool.add_update_listener(self._follow_updates)
            names = {e.name for e in pool.endpoints}
            gone = [n for n in self._subscribed if n not in names]
            for name in gone:
                self._subscribed.discard(name)
                self.ingestor.remove(name)
            self._follow_pool(list(pool.endpoints), [])

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following the pool and end the ingestion thread, waiting at most ``timeout`` s. Idempotent."""
        super().stop()
        self._unfollow()
        self._pool = None
        self._subscribed.clear()
        if self.ingestor is not None:
            self.ingestor.stop(timeout)
            self.ingestor = None
        if self.renderer is not None:
            with contextlib.suppress(RuntimeError):  # no loop running: no session was opened on one
                self._closing = asyncio.get_running_loop().create_task(self.renderer.close())

    close = stop

    def _unfollow(self) -> None:
        if self._pool is not None:
            self._pool.remove_listener(self._follow_pool)
            self._pool.remove_update_listener(self._follow_updates)

    def subscribes(self, e: Endpoint) -> bool:
        """Whether the endpoint gets its own subscriber: pod discovery on, its labels match ``podLabelSelector``
        and its pod is in ``podNamespace`` (when set)."""
        return (self.discover and self.pod_selector.matches(e.labels)
                and (self.pod_namespace is None or e.namespace == self.pod_namespace))

    def _follow_pool(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:
            self._expect.pop(e.name, None)
            self._subscribed.discard(e.name)
            if self.ingestor is not None:
                self.ingestor.remove(e.name)  # also drops its index slot
        for e in added:
            self.index.slot(e.name)
            self._follow(e)

    def _follow_updates(self, changed: list[Endpoint]) -> None:
        for e in changed:
            self._follow(e)

    def _forget_restarted(self, endpoint: Endpoint, last_seen: float) -> None:
        """The approximate fallback forgets it; so does the event index, unless its stream showed the restart
        (``EventIngestor.restarted``)."""
        super()._forget_restarted(endpoint, last_seen)
        if self.ingestor is not None:
            self.ingestor.restarted(endpoint.name, last_seen)

    def _follow(self, e: Endpoint) -> None:
        """Subscribe (or re-point the subscriber) when the endpoint qualifies; an endpoint that stopped qualifying
        (relabelled) is unsubscribed and its blocks forgotten, as llm-d tears it down: its matches fall back."""
        if self.ingestor is None:
            return
        if self.subscribes(e):
            address, replay = self.addresses(e)
            self.ingestor.add(e.name, address, replay)  # the same addresses again: nothing happens
            self._subscribed.add(e.name)
        elif e.name in self._subscribed:
            self._subscribed.discard(e.name)
            self.ingestor.remove(e.name)
        elif self.discover:
            log.debug("kv events: %s not subscribed (podLabelSelector / podNamespace)", e.name)

    def addresses(self, e: Endpoint) -> tuple[str, str | None]:
        """The endpoint's publisher and replay addresses: its own (static file, pod annotation or named port) or
        the pool's default ports, offset by its data-parallel rank as vLLM binds them."""
        host = f"[{e.address}]" if ":" in e.address else e.address
        address = e.kv_events or f"tcp://{host}:{self.socket_port + e.rank}"
        replay = e.kv_events_replay or (f"tcp://{host}:{self.replay_port + e.rank}" if self.replay_port else None)
        return address, replay

    def _resolve_pod(self, pod: str) -> str | None:
        pool = self.handle.pool if self.handle else None
        for e in pool.endpoints if pool else ():
            if pod in (e.hostport, e.address, e.name):
                return e.name
        return None

    def _apply(self, name: str, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored) and ev.lora and ev.lora not in self.adapters:
                self.adapters.add(ev.lora)
        self.index.apply(self.index.slot(name), events)

    # -- tokens and keys -------------------------------------------------------------------------------

    def block_tokens_for(self, endpoints: Sequence[Endpoint]) -> int:
        return self.block_tokens

    def _root(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> int:
        model = request.target_model or request.body.model
        return self.keys.root(model if model in self.adapters or self._is_adapter(model, endpoints) else None,
                              request.body.cache_salt)

    def _all_precise(self, endpoints: Sequence[Endpoint]) -> bool:
        """Every endpoint is matched from its events (none by the approximate fallback)."""
        now = time.monotonic()
        return all(self.index.slot_of(e.name) is not None and self.live(e, now) for e in endpoints)

    def _partial(self, local: LocalTokenizer, request: InferenceRequest, pieces: list[str | int],
                 add_special: bool, endpoints: Sequence[Endpoint]) -> _Partial | None:
        """The prompt's leading ids when the text after them cannot change any endpoint's match, else None.

        A match is a run of blocks from the first, and a block's key chains every token before it. Text the token
        cache has never seen (a new question, a unique prompt) is encoded only as far as the block it starts in:
        when no endpoint holds that block (or one before it), no endpoint's run reaches the text after it, so its
        ~0.3-4 ms of encoding is skipped and its tokens estimated from the learned characters per token. A run
        that does reach it (a retried prompt, a turn's earlier answer the pod cached) is tokenized in full."""
        u = local.first_unknown(pieces)
        cpt = local.chars_per_token()
        if u is None or cpt is None or not endpoints or not self._all_precise(endpoints):
            return None
        ids = local.assemble(pieces[:u], add_special)
        root = self._root(request, endpoints)
        keys = self.keys.chain(ids, root, self.max_blocks)
        rest_chars = len(pieces[u])
        if len(keys) < self.max_blocks and self.index.held_run(keys) == len(keys):
            bs = self.block_tokens
            need = bs - len(ids) % bs  # tokens that complete the block the unknown text starts in
            got = local.head(pieces[u], int(need * cpt * 1.5) + 16)
            if got is None or len(got[0]) < need:
                return None
            head, cut = got
            block = self.keys.chain(ids[len(keys) * bs:] + head[:need], keys[-1] if keys else root, 1)
            if self.index.held_run(block):
                return None
            ids = ids + head
            rest_chars -= cut
            keys += self.keys.chain(ids[len(keys) * bs:], keys[-1] if keys else root, self.max_blocks - len(keys))
        rest = round(rest_chars / cpt) + sum(1 if isinstance(p, int) else round(len(p) / cpt) for p in pieces[u + 1:])
        return _Partial(ids, rest, pieces, add_special, root, keys)

    def _tokens(self, request: InferenceRequest) -> list[int] | _Partial | None:
        if self.local is not None:
            key = (self._key, "tokens")  # prepare_request's, when it ran
            return request.attributes[key] if key in request.attributes else self.local.request_tokens(request)
        if request.body.prompt_token_ids is not None:
            return request.body.prompt_token_ids
        return request.attributes.get((self._key, "rendered"))

    async def prepare_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        """Without a local tokenizer: the prompt's token ids from a pod's renderer (cached), before scheduling;
        within ``renderTimeout`` in all, else the request is matched by the approximate index. With one: a
        prompt bringing at least ``OFFLOAD_CHARS`` of text the token cache lacks (a new system prompt, a pasted
        document: ~6 ms per 18k characters) is encoded on a worker thread, so the loop keeps serving the other
        requests meanwhile; the rest (a new question) is encoded inline -- unless no endpoint can match it
        (``_partial``), which is then not encoded at all."""
        if self.local is not None:
            await self._tokenize(self.local, request, endpoints)
            return
        r = self.renderer
        if r is None or request.body.prompt_token_ids is not None or not endpoints:
            return
        found = r.cached(request)
        if found is None or isinstance(found, list):
            request.attributes[(self._key, "rendered")] = found
            return
        key, query = found
        e = min(endpoints, key=lambda x: x.inflight_requests)  # the least busy pod answers soonest
        try:
            ids = await asyncio.wait_for(r.render(f"http://{e.hostport}", key, query), r.timeout)
        except TimeoutError:
            r.failures += 1
            ids = None
        request.attributes[(self._key, "rendered")] = ids

    async def _tokenize(self, local: LocalTokenizer, request: InferenceRequest,
                        endpoints: Sequence[Endpoint]) -> None:
        found = local.prompt(request)
        ids: list[int] | _Partial | None = request.body.prompt_token_ids  # None: it cannot be rendered here
        if found is not None:
            pieces = local.pieces(found[0])
            partial = self._partial(local, request, pieces, found[1], endpoints)
            if partial is not None:
                request.attributes[(self._key, "tokens")] = partial
                return
            missing = local.missing(pieces)
            if sum(map(len, missing)) >= OFFLOAD_CHARS:
                local.remember(missing, await asyncio.to_thread(local.encode_texts, missing))
            ids = local.assemble(pieces, found[1])
        request.attributes[(self._key, "tokens")] = ids  # what request_tokens would give, rendered once

    def state(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> PrefixState:
        st = request.attributes.get(self._key)
        if st is None:
            ids = self._tokens(request)
            if ids is None:
                base = self._hash(request, self.block_tokens)
                st = PreciseState(base.hashes, base.block_tokens, base.covered_tokens, base.prompt_tokens,
                                  base.kind, base.unit)
            else:
                bs = self.block_tokens
                root = self._root(request, endpoints)
                rest = 0
                partial = None
                if isinstance(ids, _Partial):
                    keys = ids.keys if ids.root == root else self.keys.chain(ids.ids, root, self.max_blocks)
                    if self._pending and keys:
                        self._complete(keys)
                    # Events (or speculation) since prepare_request may have made the run reach the untokenized
                    # text: encode it.
                    if (len(keys) < self.max_blocks and self.index.held_run(keys) == len(keys)) \
                            or not self._all_precise(endpoints):
                        assert self.local is not None
                        ids = self.local.assemble(ids.pieces, ids.add_special)
                    else:
                        partial, ids, rest = ids, ids.ids, ids.rest_tokens
                if partial is None:
                    keys = self.keys.chain(ids, root, self.max_blocks)
                    if self._pending and keys:
                        self._complete(keys)
                total = len(ids) + rest
                st = PreciseState(keys, bs, len(keys) * bs, total, "ids", float(bs),
                                  total_blocks=min(self.max_blocks, total // bs), precise=True, rest=partial)
            request.attributes[self._key] = st
        return st

    @staticmethod
    def _is_adapter(model: str, endpoints: Sequence[Endpoint]) -> bool:
        return any(model in e.metrics.active_models or model in e.metrics.waiting_models for e in endpoints)

    # -- matching ---------------------------------------------------------------------------------

    def live(self, e: Endpoint, now: float | None = None) -> bool:
        """Whether the endpoint's events can be trusted: it has published, and not gone quiet after picks that
        should have made it publish."""
        ing = self.ingestor
        last = ing.stats.last_frame.get(e.name) if ing is not None else None
        if last is None:
            return False
        expect = self._expect.get(e.name)
        if expect is None:
            return True
        if last >= expect:
            self._expect.pop(e.name, None)
            return True
        return (time.monotonic() if now is None else now) - expect <= self.stale_after

    def match(self, state: PrefixState, endpoint: Endpoint) -> int:
        return self.match_all(state, [endpoint])[0]

    def match_all(self, state: PrefixState, endpoints: Sequence[Endpoint]) -> list[int]:
        if not state.hashes:
            return [0] * len(endpoints)
        memo = state.matches
        todo = [e for e in endpoints if e.name not in memo]
        if todo:
            precise = isinstance(state, PreciseState) and state.precise
            now = time.monotonic()
            slots: dict[int, str] = {}
            fallback: list[Endpoint] = []
            for e in todo:
                s = self.index.slot_of(e.name) if precise and self.live(e, now) else None
                if s is None:
                    fallback.append(e)
                else:
                    slots[s] = e.name
            if slots:
                memo.update(self.index.match(state.hashes, slots))
                self.lookups["precise"] += len(slots)
            if fallback:
                self.lookups["fallback" if precise else "untokenized"] += len(fallback)
                for e, m in zip(fallback, super().match_all(state, fallback), strict=True):
                    memo[e.name] = m
                    self.fallbacks[e.name] += 1
        return [memo[e.name] for e in endpoints]

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        super().pre_request(request, result)
        st = request.attributes.get(self._key)
        if not st or not result.endpoints:
            return
        e = result.endpoints[0]
        if st.matches.get(e.name, 0) < len(st.hashes) and e.name not in self._expect:
            self._expect[e.name] = time.monotonic()  # blocks to store: its events should follow
        if self.speculative and isinstance(st, PreciseState) and st.precise:
            self.index.speculate(e.name, st.hashes)
            if st.rest is not None:
                self._speculate_rest(e.name, st)

    def _speculate_rest(self, name: str, st: PreciseState) -> None:
        """The endpoint will hold the whole prompt, but its untokenized text has no keys to speculate. It is kept
        (until the speculation expires) under the last key speculated, and encoded only when a later request's
        run stops there (``_complete``): the next request of a new system prompt, a retried prompt. A unique
        prompt is never encoded."""
        if not st.hashes:
            return
        now = time.monotonic()
        self._expire_pending(now)
        key = st.hashes[-1]
        self._pending[key] = (name, st)
        self._pending_expiry.append((now + self.index.ttl, key, st))

    def _expire_pending(self, now: float) -> None:
        q = self._pending_expiry
        while q and (q[0][0] <= now or len(q) > MAX_PENDING):
            _, key, st = q.popleft()
            if self._pending.get(key, ("", None))[1] is st:
                del self._pending[key]

    def _complete(self, keys: list[int]) -> None:
        """Speculate the rest of each picked prompt whose speculated keys end inside ``keys``' run (its endpoint
        may have published the first blocks already: the run goes past them)."""
        self._expire_pending(time.monotonic())
        pending = self._pending
        while True:
            found = [pending.pop(k) for k in keys[: self.index.held_run(keys)] if k in pending]
            if not found or self.local is None:
                return
            for name, st in found:
                rest, n = st.rest, len(st.hashes)
                if rest is not None and n < self.max_blocks:
                    ids = self.local.assemble(rest.pieces, rest.add_special)
                    self.index.speculate(name, self.keys.chain(ids[n * self.block_tokens:], st.hashes[-1],
                                                               self.max_blocks - n))

    # -- observability ------------------------------------------------------------------------------

    def indexer_size(self) -> int:
        return super().indexer_size() + self.index.size()

    def debug_state(self) -> dict[str, object]:
        ing = self.ingestor
        pool = self.handle.pool if self.handle else None
        now = time.monotonic()
        return {"blocks": self.index.size(), "speculative": len(self.index.speculative), "engine": self.engine,
                "subscribed": sorted(self._subscribed),
                "live": {e.name: self.live(e, now) for e in (pool.endpoints if pool else ())},
                "lookups": dict(self.lookups), "dropped": dict(ing.stats.dropped) if ing else {},
                "tokenCache": {"hits": self.local.cache.hits, "misses": self.local.cache.misses}
                if self.local else None}

    def metric_families(self) -> Iterator[Any]:
        """``epp_kv_events_*`` and ``epp_precise_prefix_*`` (llm-d's ``kvcache_index_*`` in our naming)."""
        ing = self.ingestor
        name = self.name
        pool = self.handle.pool if self.handle else None
        now = time.monotonic()
        live = GaugeMetricFamily("epp_kv_events_endpoint_live", "1 when the endpoint's KV events drive its prefix "
                                 "match; 0: the approximate index does (no events yet, or they stopped).",
                                 labels=["plugin", "endpoint"])
        for e in pool.endpoints if pool else ():
            live.add_metric([name, e.name], 1.0 if self.live(e, now) else 0.0)
        yield live
        lookups = CounterMetricFamily("epp_precise_prefix_lookups", "Per-endpoint prefix matches by source: precise "
                                      "(KV events), fallback (approximate index), untokenized (no token ids).",
                                      labels=["plugin", "source"])
        for source in ("precise", "fallback", "untokenized"):
            lookups.add_metric([name, source], self.lookups[source])
        yield lookups
        fb = CounterMetricFamily("epp_precise_prefix_fallback", "Prefix matches served by the approximate index, per "
                                 "endpoint.", labels=["plugin", "endpoint"])
        for ep, n in list(self.fallbacks.items()):
            fb.add_metric([name, ep], n)
        yield fb
        yield GaugeMetricFamily("epp_precise_prefix_index_blocks", "Blocks (keys) in the KV-event index.",
                                value=self.index.size())
        if ing is None:
            return
        st = ing.stats
        per_endpoint = (("epp_kv_events_frames", "KV event batches applied.", st.frames),
                        ("epp_kv_events_events", "KV events applied.", st.events),
                        ("epp_kv_events_gaps", "Sequence gaps seen.", st.gaps),
                        ("epp_kv_events_replays", "Replays requested from the publisher.", st.replays),
                        ("epp_kv_events_replay_failures", "Replays that timed out.", st.replay_failures),
                        ("epp_kv_events_restarts", "Publisher restarts detected.", st.restarts),
                        ("epp_kv_events_connects", "ZMQ (re)connections to the publisher.", st.connects))
        for metric, doc, counter in per_endpoint:
            fam = CounterMetricFamily(metric, doc, labels=["plugin", "endpoint"])
            for ep, n in list(counter.items()):
                fam.add_metric([name, ep], n)
            yield fam
        dropped = CounterMetricFamily("epp_kv_events_dropped", "KV event frames or events dropped, by reason.",
                                      labels=["plugin", "reason"])
        for reason, n in list(st.dropped.items()) + [(f"skipped-{k}", v) for k, v in self.index.skipped.items()]:
            dropped.add_metric([name, reason], n)
        yield dropped
