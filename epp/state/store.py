"""Routing state shared by active-active replicas (and ``--workers``) through Valkey/Redis.

What is shared: the approximate prefix index (every pick's block hashes, per endpoint) and each replica's
in-flight load per endpoint. The request path never waits on the store: a pick appends to a local queue
(``share``) and reads only local memory; one background task per pool, every ``sync_interval``, sends the
queue and this replica's load and reads what the others sent, in one pipelined round trip:

* prefix picks: one stream entry per tick (``XADD ... MAXLEN ~``) carrying the batch; each replica reads the
  stream from where it stopped and indexes the others' picks as if it had made them. A replica that starts (or
  comes back) reads the stream's retained history first, so it does not start cold.
* load: a hash field per replica (JSON ``{endpoint: [requests, tokens]}``) and a heartbeat (a sorted set scored
  by the replica's clock); replicas whose heartbeat is older than ``dead_after`` no longer count. The sum of the
  others' load is folded into ``Endpoint.inflight_requests`` / ``inflight_tokens`` (and kept apart in
  ``remote_*``), so every scorer, filter and saturation check sees the whole fleet's load unchanged.

Staleness is bounded: the others' picks arrive within about one interval plus a round trip; their load is
dropped (each replica falls back to its own counts) once no sync succeeded for ``max_staleness``. When the store
is slow or down, syncs time out and retry with backoff; picks made meanwhile wait in a bounded queue (the oldest
dropped and counted) and no request notices.

With precise prefix routing (KV events), each replica subscribes to the model servers' events itself and its
index is consistent by construction: the store then only carries the load (see docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.datalayer.pool import EndpointPool
from epp.tasks import stop_task

log = logging.getLogger(__name__)

PASSWORD_ENV = "EPP_STATE_STORE_PASSWORD"
MAX_BACKOFF = 2.0  # seconds between attempts while the store is down
FORGET_AFTER = 60.0  # seconds after which a dead replica's load entry is deleted from the store
READ_BATCH = 256  # stream entries read per sync (a starting replica catches up over several)


def replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def read_password(path: str) -> str | None:
    """The store's password: the file's first line when given (a mounted Secret), else $EPP_STATE_STORE_PASSWORD."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None
    return os.environ.get(PASSWORD_ENV) or None


@dataclass(frozen=True)
class StoreOptions:
    url: str
    password: str | None
    namespace: str  # key prefix; the pool's name is appended
    sync_interval: float
    max_staleness: float
    timeout: float  # per round trip
    stream_max_len: int = 20_000  # stream entries (one per replica per tick with picks) kept for catch-up
    max_pending: int = 50_000  # picks queued while the store is unreachable

    @classmethod
    def from_config(cls, cfg: Any) -> StoreOptions:
        """From epp.config.Config's ``state_store_*`` (the defaults live there)."""
        return cls(cfg.state_store_url, read_password(cfg.state_store_password_file), cfg.state_store_namespace,
                   cfg.state_store_sync_interval, cfg.state_store_max_staleness, cfg.state_store_timeout)

    @property
    def dead_after(self) -> float:
        return max(self.max_staleness, 4 * self.sync_interval)


@dataclass(slots=True)
class StoreStats:
    up: bool = False
    last_ok: float = 0.0  # time.monotonic() of the last successful sync
    errors: int = 0
    syncs: int = 0
    replicas: int = 0  # live replicas, this one included
    sent: int = 0  # prefix picks sent
    received: int = 0  # prefix picks of other replicas indexed
    dropped: int = 0  # picks dropped from a full queue while the store was unreachable


Sharer = Callable[[str, str, Sequence[int], float], None]


class SharedState:
    """One pool's shared state. ``producers()`` yields the prefix producers of the configuration in force
    (re-read every sync, so a config reload is followed); each gets ``share`` as its hook."""

    def __init__(self, opts: StoreOptions, pool: EndpointPool, producers: Callable[[], Iterable[Any]],
                 client: Any = None, replica: str | None = None) -> None:
        self.opts = opts
        self.pool = pool
        self.producers = producers
        self.replica = replica or replica_id()
        ns = f"{opts.namespace}:{pool.name}"
        self.k_stream, self.k_load, self.k_beat = f"{ns}:prefix", f"{ns}:load", f"{ns}:beat"
        self._client = client
        self._pending: deque[tuple[str, str, Sequence[int], float]] = deque()
        self._last_id = "0-0"  # the stream's history first: a new replica starts warm
        self._task: asyncio.Task[None] | None = None
        self._remote: dict[str, tuple[int, int]] = {}  # endpoint -> the others' (requests, tokens)
        self._dead: list[str] = []  # replicas whose heartbeat stopped long ago
        self.stats = StoreStats()

    # -- the request path ---------------------------------------------------------------------------

    def share(self, producer: str, endpoint: str, hashes: Sequence[int], block_tokens: float) -> None:
        pending = self._pending
        if len(pending) >= self.opts.max_pending:
            pending.popleft()
            self.stats.dropped += 1
        pending.append((producer, endpoint, hashes, block_tokens))

    # -- lifecycle ------------------------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            import redis.asyncio as redis  # imported only when a store is configured

            o = self.opts
            self._client = redis.from_url(o.url, password=o.password, socket_timeout=o.timeout,
                                          socket_connect_timeout=o.timeout, health_check_interval=0)
        return self._client

    async def start(self) -> None:
        self._hook()
        self._task = asyncio.create_task(self._run(), name=f"state-store-{self.pool.name}")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        for p in self.producers():
            if getattr(p, "share", None) == self.share:
                p.share = None
        if self._client is not None:
            with contextlib.suppress(Exception):  # leave at once rather than after dead_after
                pipe = self._client.pipeline(transaction=False)
                pipe.hdel(self.k_load, self.replica).zrem(self.k_beat, self.replica)
                await asyncio.wait_for(pipe.execute(), self.opts.timeout)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.aclose(), self.opts.timeout)

    def _hook(self) -> None:
        for p in self.producers():
            p.share = self.share

    async def _run(self) -> None:
        backoff = self.opts.sync_interval
        while True:
            try:
                async with asyncio.timeout(self.opts.timeout * 2):  # not wait_for: see epp.tasks
                    await self.sync()
                backoff = self.opts.sync_interval
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store is slow or down: keep routing on local state, try again
                self.stats.errors += 1
                if self.stats.up or self.stats.errors == 1:
                    log.warning("state store %s unreachable, routing on local state: %s", self.opts.url, e or type(e))
                self.stats.up = False
                backoff = min(MAX_BACKOFF, backoff * 2)
            self._expire()
            await asyncio.sleep(backoff)

    # -- one round trip ---------------------------------------------------------------------------------

    async def sync(self) -> None:
        self._hook()
        batch, self._pending = self._pending, deque()
        try:
            await self._sync(list(batch))
        except BaseException:
            batch.extend(self._pending)  # not sent: back in front of the picks made meanwhile, still bounded
            while len(batch) > self.opts.max_pending:
                batch.popleft()
                self.stats.dropped += 1
            self._pending = batch
            raise

    async def _sync(self, batch: list[tuple[str, str, Sequence[int], float]]) -> None:
        now = time.time()
        pipe = self.client().pipeline(transaction=False)
        if batch:
            meta = [[p, e, len(h), bt] for p, e, h, bt in batch]
            hashes = array("Q")
            for _, _, h, _ in batch:
                hashes.extend(h)
            pipe.xadd(self.k_stream, {"r": self.replica, "m": json.dumps(meta), "h": hashes.tobytes()},
                      maxlen=self.opts.stream_max_len, approximate=True)
        if self._dead:
            pipe.hdel(self.k_load, *self._dead).zrem(self.k_beat, *self._dead)
        pipe.hset(self.k_load, self.replica, json.dumps(self._local_load()))
        pipe.zadd(self.k_beat, {self.replica: now})
        pipe.zrange(self.k_beat, 0, -1, withscores=True)
        pipe.hgetall(self.k_load)
        pipe.xread({self.k_stream: self._last_id}, count=READ_BATCH)
        *_, beats, loads, entries = await pipe.execute()
        self._dead = []
        self.stats.sent += len(batch)
        self._apply_load(beats, loads, now)
        self._apply_prefix(entries)
        st = self.stats
        if not st.up:
            log.info("state store %s reachable: sharing routing state with %d replica(s)", self.opts.url,
                     st.replicas - 1)
        st.up, st.last_ok, st.syncs = True, time.monotonic(), st.syncs + 1

    def _local_load(self) -> dict[str, list[int]]:
        out = {}
        for e in self.pool.endpoints:
            req = e.inflight_requests - e.remote_requests
            tok = e.inflight_tokens - e.remote_tokens
            if req > 0 or tok > 0:
                out[e.name] = [max(0, req), max(0, tok)]
        return out

    def _apply_load(self, beats: list[tuple[Any, float]], loads: dict[Any, Any], now: float) -> None:
        live, dead = set(), []
        for member, score in beats:
            name = _text(member)
            if now - score <= self.opts.dead_after:
                live.add(name)
            elif now - score > FORGET_AFTER:
                dead.append(name)
        self.stats.replicas = len(live | {self.replica})
        totals: dict[str, list[int]] = {}
        for member, raw in loads.items():
            name = _text(member)
            if name == self.replica or name not in live:
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                for endpoint, (req, tok) in json.loads(raw).items():
                    t = totals.setdefault(endpoint, [0, 0])
                    t[0] += int(req)
                    t[1] += int(tok)
        self._set_remote({k: (v[0], v[1]) for k, v in totals.items()})
        self._dead = dead  # deleted on the next sync

    def _set_remote(self, remote: dict[str, tuple[int, int]]) -> None:
        """Fold the others' load into each endpoint's in-flight counts (kept apart in ``remote_*``)."""
        for e in self.pool.endpoints:
            req, tok = remote.get(e.name, (0, 0))
            if req != e.remote_requests or tok != e.remote_tokens:
                e.inflight_requests = max(0, e.inflight_requests + req - e.remote_requests)
                e.inflight_tokens = max(0, e.inflight_tokens + tok - e.remote_tokens)
                e.remote_requests, e.remote_tokens = req, tok
        self._remote = remote

    def _expire(self) -> None:
        """Past ``max_staleness`` without a sync, the others' load is unknown: count only our own."""
        st = self.stats
        if self._remote and time.monotonic() - st.last_ok > self.opts.max_staleness:
            log.warning("state store: no sync for %.1fs, other replicas' load dropped", self.opts.max_staleness)
            self._set_remote({})

    def _apply_prefix(self, entries: list[Any]) -> None:
        if not entries:
            return
        producers = {p.name: p for p in self.producers()}
        for _stream, items in entries:
            for entry_id, fields in items:
                self._last_id = _text(entry_id)
                if _text(fields.get(b"r", b"")) == self.replica:
                    continue
                try:
                    meta = json.loads(fields[b"m"])
                    hashes = array("Q")
                    hashes.frombytes(fields[b"h"])
                except (KeyError, ValueError, TypeError):
                    continue
                pos = 0
                for name, endpoint_name, n, block_tokens in meta:
                    chunk, pos = hashes[pos: pos + n], pos + n
                    producer = producers.get(name)
                    endpoint = self.pool.get(endpoint_name)
                    if producer is not None and endpoint is not None and n:
                        producer.insert_remote(endpoint, chunk.tolist(), float(block_tokens))
                        self.stats.received += 1

    # -- metrics ----------------------------------------------------------------------------------------

    def age(self) -> float:
        return time.monotonic() - self.stats.last_ok if self.stats.last_ok else -1.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StoreCollector(Collector):
    """``epp_state_store_*``, labelled by pool, read at scrape time."""

    def __init__(self, stores: Callable[[], Iterable[SharedState]]) -> None:
        self.stores = stores

    def collect(self) -> Iterator[Any]:
        def family(kind: type, name: str, doc: str) -> Any:
            return kind(name, doc, labels=["pool"])

        up = family(GaugeMetricFamily, "epp_state_store_up", "1 when the last sync with the shared store succeeded.")
        age = family(GaugeMetricFamily, "epp_state_store_sync_age_seconds",
                     "Seconds since the last successful sync with the shared store (the staleness of the other "
                     "replicas' state; -1: never).")
        replicas = family(GaugeMetricFamily, "epp_state_store_replicas", "Live replicas sharing state, this one "
                          "included.")
        errors = family(CounterMetricFamily, "epp_state_store_sync_errors", "Syncs with the shared store that failed.")
        sent = family(CounterMetricFamily, "epp_state_store_prefix_sent", "Prefix picks sent to the shared store.")
        received = family(CounterMetricFamily, "epp_state_store_prefix_received",
                          "Other replicas' prefix picks indexed.")
        dropped = family(CounterMetricFamily, "epp_state_store_prefix_dropped",
                         "Prefix picks dropped from the queue while the store was unreachable.")
        remote = GaugeMetricFamily("epp_endpoint_remote_inflight_requests",
                                   "Requests other replicas routed to the endpoint that have not ended.",
                                   labels=["pool", "endpoint"])
        for s in list(self.stores()):
            pool, st = s.pool.name, s.stats
            up.add_metric([pool], 1.0 if st.up else 0.0)
            age.add_metric([pool], s.age())
            replicas.add_metric([pool], st.replicas)
            errors.add_metric([pool], st.errors)
            sent.add_metric([pool], st.sent)
            received.add_metric([pool], st.received)
            dropped.add_metric([pool], st.dropped)
            for e in s.pool.endpoints:
                remote.add_metric([pool, e.name], e.remote_requests)
        yield from (up, age, replicas, errors, sent, received, dropped, remote)


def prefix_producers(config: Any) -> list[Any]:
    """The approximate prefix producers of a PickerConfig (standalone ones and those scorers embed), by name."""
    found: dict[str, Any] = {}
    for plugin in list(getattr(config, "plugins", {}).values()):
        get = getattr(plugin, "prefix_producer", None)
        if callable(get):
            producer = get()
            if hasattr(producer, "insert_remote"):
                found[producer.name] = producer
    return list(found.values())
