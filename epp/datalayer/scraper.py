"""Polls every endpoint's Prometheus page and keeps ``Endpoint.metrics`` current.

One keep-alive HTTP/1.1 connection per endpoint (``epp.datalayer.http1``) and one task per endpoint,
started and stopped by the pool listener. A scrape that fails for any reason (connect error, timeout, non-200,
unreadable page, missing load metric) leaves the previous values in place, sets
``metrics.last_error`` and does not stamp ``metrics.updated_at``, so ``metrics.age()`` keeps growing
and staleness-aware plugins can tell.

A scrape the server did not answer at all (connection refused or reset, timeout) is worse news than a bad
page: after ``UNREACHABLE_AFTER`` of them in a row the endpoint is marked ``metrics.unreachable`` and the
director stops offering it as a candidate (unless nothing else is left) until it answers HTTP again.
Static endpoints have no other health signal, and a Kubernetes pod can die long before its watch says so.

A pod that restarted at the same address answers again with an empty KV cache: a counter on its page went
backwards, or its process start time moved (``epp.datalayer.restarts``). The scrape that first sees it logs it,
counts it (``ScrapeStats.restarts``: ``epp_endpoint_restarts_total``) and tells the pool's restart listeners, so
that the prefix indexes forget the endpoint at once rather than after misses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from epp.config import Config
from epp.datalayer import promtext
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.engines import EngineRegistry, EngineSpec, ExtractError
from epp.datalayer.http1 import Http1Client, HttpError, Unanswered
from epp.datalayer.pool import EndpointPool
from epp.datalayer.restarts import RestartDetector, read_signals, restart_families
from epp.datalayer.sources import METRICS_PATH, METRICS_SCHEME
from epp.tasks import stop_tasks

log = logging.getLogger(__name__)

# (page text, families) -> ParseResult; swappable so the benchmark can compare parsers.
Parser = Callable[[str, Iterable[str]], promtext.ParseResult]

UNREACHABLE_AFTER = 3  # unanswered scrapes in a row (150 ms at the default interval)

_ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"  # never OpenMetrics: we parse the classic format


@dataclass(slots=True)
class ScrapeStats:
    """Plain per-endpoint counters (EPP's own Prometheus metrics are wired from these)."""

    scrapes: int = 0  # attempts, including failures
    errors: int = 0
    consecutive_errors: int = 0
    consecutive_unanswered: int = 0  # failures where the server did not answer HTTP at all
    last_duration: float = 0.0  # seconds, request + parse + extract
    last_error: str | None = None
    last_missing: tuple[str, ...] = ()  # optional families (LoRA, cache info) absent last time
    restarts: int = 0  # server restarts seen in the metrics
    signals: RestartDetector = field(default_factory=RestartDetector)


class MetricsScraper:
    def __init__(
        self,
        pool: EndpointPool,
        interval: float = Config.refresh_metrics_interval,
        timeout: float = 1.0,
        engines: EngineRegistry | None = None,
        path: str = METRICS_PATH,
        scheme: str = METRICS_SCHEME,
        *,
        parser: Parser | None = None,
    ) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, not {scheme!r}")
        self.pool = pool
        self.interval = interval
        self.timeout = timeout
        self.engines = engines or EngineRegistry()
        self.path = path if path.startswith("/") else "/" + path
        self.scheme = scheme
        self._parse: Parser = parser or promtext.parse
        self._client: Http1Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._stats: dict[Endpoint, ScrapeStats] = {}
        self._urls: dict[Endpoint, tuple[str, str, int, str]] = {}  # url -> host, port, path and query
        self._families: dict[str, tuple[EngineSpec, frozenset[str]]] = {}  # engine name -> families read
        self._dying: set[asyncio.Task[None]] = set()  # cancelled on removal, not yet finished
        self._listening = False
        self._running = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # One connection per endpoint, one request at a time on it. insecureSkipVerify=true as GIE.
        context = None
        if self.scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self._client = Http1Client(_ACCEPT, context)
        self._running = True
        if not self._listening:  # the pool has no remove_listener: register once, gate on _running
            self.pool.add_listener(self._on_pool_change)
            self._listening = True
        for ep in self.pool.endpoints:
            self._spawn(ep)

    async def stop(self) -> None:
        self._running = False
        tasks = [*self._tasks.values(), *self._dying]
        self._tasks.clear()
        await stop_tasks(tasks)
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- introspection --------------------------------------------------------------------------

    def stats(self, endpoint: Endpoint) -> ScrapeStats | None:
        return self._stats.get(endpoint)

    @property
    def all_stats(self) -> dict[Endpoint, ScrapeStats]:
        return dict(self._stats)

    @property
    def polling(self) -> frozenset[Endpoint]:
        """Endpoints with a live polling task."""
        return frozenset(ep for ep, t in self._tasks.items() if not t.done())

    def url_for(self, endpoint: Endpoint) -> str:
        base = endpoint.metrics_url_base
        if self.scheme != "http" and base.startswith("http://"):
            base = f"{self.scheme}://{base[len('http://'):]}"
        return base + self.path

    def _target(self, ep: Endpoint) -> tuple[str, int, str]:
        """Host, port and request target of the endpoint's metrics URL, parsed once per URL."""
        text = self.url_for(ep)
        cached = self._urls.get(ep)
        if cached is None or cached[0] != text:
            u = urlsplit(text)
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
            cached = self._urls[ep] = (text, u.hostname or "", u.port or (443 if u.scheme == "https" else 80), target)
        return cached[1], cached[2], cached[3]

    # -- pool membership ------------------------------------------------------------------------

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._running or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._apply_change(added, removed)
        else:  # discovery running on another thread
            self._loop.call_soon_threadsafe(self._apply_change, added, removed)

    def _apply_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        if not self._running:
            return
        for ep in removed:
            task = self._tasks.pop(ep, None)
            if task is not None:
                task.cancel()
                self._dying.add(task)
                task.add_done_callback(self._dying.discard)
            self._stats.pop(ep, None)
            self._urls.pop(ep, None)
            if self._client is not None:
                self._client.drop(ep)
        for ep in added:
            self._spawn(ep)

    def _spawn(self, ep: Endpoint) -> None:
        if ep in self._tasks:
            return
        self._stats.setdefault(ep, ScrapeStats())
        self._tasks[ep] = asyncio.get_running_loop().create_task(self._poll(ep), name=f"scrape {ep.name}")

    # -- polling --------------------------------------------------------------------------------

    async def _poll(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        # Random phase so that N endpoints spread over the interval instead of firing together.
        await asyncio.sleep(random.uniform(0, interval))
        next_tick = loop.time()
        while True:
            await self.scrape_once(ep)
            next_tick += interval
            now = loop.time()
            if next_tick < now:
                # Overran (slow or hung server): skip the missed ticks but keep our phase, so endpoints
                # that all stalled together do not come back in lockstep.
                next_tick += math.ceil((now - next_tick) / interval) * interval
            await asyncio.sleep(next_tick - now)

    async def scrape_once(self, ep: Endpoint) -> bool:
        """One scrape of ``ep``; returns True on success. Never raises (except cancellation)."""
        stats = self._stats.setdefault(ep, ScrapeStats())
        client = self._client
        if client is None:
            raise RuntimeError("MetricsScraper not started")
        t0 = time.perf_counter()
        stats.scrapes += 1
        error: str | None
        answered = True  # the server spoke HTTP, whatever it said
        try:
            error = await self._scrape(client, ep, stats)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error, answered = f"timeout after {self.timeout:g}s", False
        except Unanswered as e:
            error, answered = f"no answer: {e}"[:160], False
        except OSError as e:  # connecting (refused, unreachable, TLS)
            error, answered = f"connect: {e.strerror or e}"[:160], False
        except HttpError as e:
            error = f"HttpError: {e}"[:160]
        except Exception as e:  # never let one bad page kill the polling task
            log.exception("scraping %s failed unexpectedly", ep.name)
            error = f"{type(e).__name__}: {e}"[:160]
        self._note_reachability(ep, stats, answered)
        stats.last_duration = time.perf_counter() - t0
        m = ep.metrics
        if error is None:
            if stats.consecutive_errors:
                log.info("metrics of %s readable again after %d failed scrapes",
                         ep.name, stats.consecutive_errors)
            stats.consecutive_errors = 0
            stats.last_error = None
            m.last_error = None
            m.updated_at = time.monotonic()
            return True
        stats.errors += 1
        stats.consecutive_errors += 1
        if error != stats.last_error:  # log transitions, not every 50 ms
            log.warning("scraping %s (%s): %s", ep.name, self.url_for(ep), error)
        stats.last_error = error
        m.last_error = error
        return False

    @staticmethod
    def _note_reachability(ep: Endpoint, stats: ScrapeStats, answered: bool) -> None:
        if answered:
            if ep.metrics.unreachable:
                log.warning("%s answers again: back in the candidate set", ep.name)
            stats.consecutive_unanswered = 0
            ep.metrics.unreachable = False
            return
        stats.consecutive_unanswered += 1
        if stats.consecutive_unanswered >= UNREACHABLE_AFTER and not ep.metrics.unreachable:
            log.warning("%s did not answer %d scrapes in a row: out of the candidate set until it does",
                        ep.name, stats.consecutive_unanswered)
            ep.metrics.unreachable = True

    def _families_of(self, engine: EngineSpec) -> frozenset[str]:
        """The engine's families plus its restart signals, computed once per engine."""
        cached = self._families.get(engine.name)
        if cached is None or cached[0] is not engine:
            cached = self._families[engine.name] = (engine, engine.families | set(restart_families(engine.name)))
        return cached[1]

    async def _scrape(self, client: Http1Client, ep: Endpoint, stats: ScrapeStats) -> str | None:
        engine = self.engines.for_endpoint(ep)
        # asyncio.timeout bounds the whole exchange, including a server that trickles the body.
        async with asyncio.timeout(self.timeout):
            status, body = await client.get(ep, *self._target(ep))
        if status != 200:
            return f"HTTP {status}"
        text = body.decode("utf-8", "replace")
        parsed = self._parse(text, self._families_of(engine))
        try:
            values = engine.extract(parsed.families)
        except ExtractError as e:
            if parsed.error:
                return f"{e} ({parsed.error})"[:200]
            return str(e)
        values.apply(ep.metrics)
        reason = stats.signals.observe(*read_signals(parsed.families, engine.name))
        if reason is not None:
            stats.restarts += 1
            log.warning("%s restarted (%s): forgetting what EPP believed its cache held", ep.name, reason)
            self.pool.restarted(ep, ep.metrics.updated_at)  # not stamped yet: the old process's last scrape
        ep.metrics.inflight_tokens_at_scrape = ep.inflight_tokens
        ep.metrics.inflight_requests_at_scrape = ep.inflight_requests
        missing = tuple(values.missing)
        if missing != stats.last_missing and missing:
            log.info("%s (engine %s): optional metric(s) not exposed: %s",
                     ep.name, engine.name, ", ".join(missing))
        stats.last_missing = missing
        return None
