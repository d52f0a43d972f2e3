"""``Admission``: decides, for each request, whether it is routed now, held, or refused.

Legacy admission (no ``flowControl`` feature gate): a sheddable request (priority < 0) is refused with 429
``rejected-saturated`` while the saturation detector reports the candidates saturated; nothing is held.

Flow control: a request is routed at once when no request of its priority or higher is waiting and the
candidates are below saturation (the usage-limit ceiling); otherwise it waits in its priority band, in its
flow (fairness id), in the band's order. A dispatch loop, running only while requests wait, releases them as
capacity frees: woken by each completed request (``completed``), and every ``POLL`` seconds for scraped
metrics. It serves the highest band first (strict priority), the band's fairness policy picks the flow, the
ordering policy the request; it stops at the first request whose candidates are saturated. A released request
is scheduled by its own task (late binding: against the pool as it is then), and the loop yields to let it, so
the next saturation check counts it.

Refusals, in the client API's envelope with ``x-llm-d-request-dropped-reason``:

* 429 ``rejected-saturated``: the band is at ``maxRequests`` / ``maxBytes``, or the global limits (``maxRequests``,
  ``maxBytes``, and the process-wide request-body budget ``--max-buffered-body-bytes``, which queued bodies count
  against) are reached and no queued request of a lower priority can be displaced. Displacement sheds the lowest
  band first, newest request first: sheddable (negative) bands go before any other.
* 503 ``rejected-ttl-expired``: waited longer than the band's ``defaultRequestTTL`` (or the shorter
  ``x-llm-d-inference-ttl`` the client asked for).
* 503 ``rejected-no-endpoints``: the pool had no endpoint for ``noEndpointRequestTTL`` (scale from zero: while
  the pool is empty requests wait, for that budget instead), or no room was left while it had none.

A client that goes away while its request waits frees its place at once (``EvictedContextCancelled``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from epp.admission.config import AdmissionConfig, FlowControlConfig, parse_ttl
from epp.admission.demand import Demand
from epp.admission.metrics import FlowControlMetrics
from epp.admission.queue import BandQueue, QueueItem
from epp.api.errors import EppError
from epp.api.types import InferenceRequest
from epp.clock import monotonic
from epp.scheduling.registry import PluginConfigError

if TYPE_CHECKING:
    from epp.datalayer.endpoint import Endpoint
    from epp.director import Director
    from epp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)

POLL = 0.02  # seconds between dispatch attempts while requests wait and nothing woke the loop
SWEEP = 0.05  # seconds between TTL sweeps
TTL_HEADER = "x-llm-d-inference-ttl"  # llm-d: a client may ask for a shorter queue-wait budget
ACTIVE_WINDOW = 300.0  # seconds a priority level counts as active (usage limits) after its last request
_NO_BODY_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")


class Budget(Protocol):
    def reserve(self, n: int) -> bool: ...

    def release(self, n: int) -> None: ...


def _saturated(message: str) -> EppError:
    return EppError(429, "rejected-saturated", message)


class Admission:
    def __init__(self, director: Director, metrics: EppMetrics | None = None) -> None:
        self.director = director
        self.config: AdmissionConfig | None = None
        self.budget: Budget | None = None  # the process's request-body budget (set by the server)
        self.bands: dict[int, BandQueue] = {}
        self.queued = 0
        self.queued_bytes = 0
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._next_sweep = 0.0
        self._seen: dict[int, float] = {}  # priority -> when a request of it last arrived
        self.demand = Demand()  # requests in flight per priority (usage-limit policies' reserve)
        self.metrics: FlowControlMetrics | None = None
        if metrics is not None:
            self.metrics = FlowControlMetrics(metrics.registry, self, lambda: director.pool.name,
                                              metrics.known_model_label)

    @property
    def flow_control(self) -> FlowControlConfig | None:
        return self.config.flow_control if self.config is not None else None

    def configure(self, config: AdmissionConfig | None) -> None:
        """A new configuration (start, live reload). Waiting requests stay in their places; with flow control
        turned off they are all released."""
        old = self.flow_control
        self.config = config
        new = self.flow_control
        if new is None:
            for band in list(self.bands.values()):
                for item in list(band.items()):
                    self._release(item, band, "Dispatched")
            return
        if old is not None:
            for priority, band in self.bands.items():
                if new.band(priority).ordering is not old.band(priority).ordering:
                    band.reorder(new.band(priority).ordering.key)  # type: ignore[union-attr]
        self._wakeup()

    def applies(self, request: InferenceRequest) -> bool:
        """Requests without a body (``GET /v1/models``, ...) are never held nor shed."""
        return self.config is not None and request.method.upper() not in _NO_BODY_METHODS

    # -- the request path ---------------------------------------------------------------------

    async def admit(self, request: InferenceRequest, subset: Sequence[str] | None) -> None:
        """Return when ``request`` may be scheduled now; raise ``EppError`` when it is refused."""
        cfg = self.config
        if cfg is None:
            return
        fc = cfg.flow_control
        director = self.director
        if fc is None:
            if request.priority < 0 and \
                    cfg.detector.saturation(director.candidates(subset, model=request.path_model)) >= 1.0:
                raise _saturated("system saturated, sheddable request dropped")
            return
        self._seen[request.priority] = monotonic()
        pool_empty = not director.pool.endpoints
        if not pool_empty:
            # a subset (or model) matching nothing is refused here, not held
            candidates = director.candidates(subset, model=request.path_model)
            if not self._waiting_at_or_above(request.priority) and self._has_room(request.priority, candidates):
                self._outcome(request, "Dispatched", 0.0)
                return
        await self._enqueue_and_wait(request, subset, fc, pool_empty)

    def started(self, request: InferenceRequest) -> None:
        """``request`` was routed (it counts in flight until ``completed``)."""
        self.demand.started(request.priority)

    def completed(self, request: InferenceRequest) -> None:
        """A routed request ended: capacity may have freed."""
        self.demand.ended(request.priority)
        if self.queued:
            self._wakeup()

    async def _enqueue_and_wait(self, request: InferenceRequest, subset: Sequence[str] | None,
                                fc: FlowControlConfig, pool_empty: bool) -> None:
        priority = request.priority
        size = len(request.raw_body)
        band_cfg = fc.band(priority)
        band = self.bands.get(priority)
        count, held = (band.count, band.bytes) if band is not None else (0, 0)
        if band_cfg.max_requests and count + 1 > band_cfg.max_requests:
            self._refuse_capacity(request, pool_empty, f"priority band {priority} holds {count} requests, its "
                                  f"maxRequests")
        if band_cfg.max_bytes and held + size > band_cfg.max_bytes:
            self._refuse_capacity(request, pool_empty, f"priority band {priority} holds {held} bytes; this "
                                  f"request's {size} would pass its maxBytes {band_cfg.max_bytes}")
        if not self._make_room(priority, size, fc):
            self._refuse_capacity(request, pool_empty, "the flow-control queue is full (maxRequests / maxBytes, "
                                  "or the endpoint picker's request-body memory)")
        now = monotonic()
        loop = asyncio.get_running_loop()
        item = QueueItem(request, subset, size, now, next(self._seq), self._ttl(fc, request), loop.create_future())
        item.key = band_cfg.ordering.key(item)  # type: ignore[union-attr]
        if band is None:
            band = self.bands[priority] = BandQueue(priority)
        band.push(item)
        self.queued += 1
        self.queued_bytes += size
        if self.metrics is not None:
            self.metrics.fairness_label(request.fairness_id)
        self._ensure_task()
        try:
            await item.future
        except asyncio.CancelledError:  # the client went away (Envoy reset the stream)
            if item.queued:
                self._take(item, self.bands[priority])
                self._outcome(request, "EvictedContextCancelled", monotonic() - item.enqueued_at)
                if not self.queued and self._task is not None:
                    self._wakeup()
            raise

    def _refuse_capacity(self, request: InferenceRequest, pool_empty: bool, why: str) -> None:
        if pool_empty:
            self._outcome(request, "RejectedNoEndpoints", 0.0)
            raise EppError(503, "rejected-no-endpoints", f"no endpoint to serve the request and no room to hold "
                           f"it: {why}")
        self._outcome(request, "RejectedCapacity", 0.0)
        raise _saturated(f"system saturated: {why}")

    def _ttl(self, fc: FlowControlConfig, request: InferenceRequest) -> float:
        ttl = fc.ttl(request.priority)
        asked = request.headers.get(TTL_HEADER)
        if asked:
            try:
                seconds = parse_ttl(asked.strip(), TTL_HEADER)
            except PluginConfigError:
                seconds = 0.0
            if seconds > 0 and (ttl <= 0 or seconds < ttl):
                ttl = seconds
        return ttl

    def _make_room(self, priority: int, size: int, fc: FlowControlConfig) -> bool:
        """Room for one more request of ``size`` bytes under the global limits, displacing queued requests of
        lower priorities if need be; reserves ``size`` in the body budget."""
        while True:
            fits = (not fc.max_requests or self.queued + 1 <= fc.max_requests) and \
                (not fc.max_bytes or self.queued_bytes + size <= fc.max_bytes)
            if fits and (self.budget is None or self.budget.reserve(size)):
                return True
            victim = self._displacement_victim(priority)
            if victim is None:
                return False
            item, band = victim
            self._finish(item, band, "EvictedDisplaced", _saturated(
                "system saturated: displaced from the flow-control queue by a request of a higher priority"))

    def _displacement_victim(self, priority: int) -> tuple[QueueItem, BandQueue] | None:
        lower = [p for p, b in self.bands.items() if p < priority and b.count]
        if not lower:
            return None
        band = self.bands[min(lower)]
        return max(band.items(), key=lambda i: i.seq), band

    # -- queue bookkeeping --------------------------------------------------------------------

    def _take(self, item: QueueItem, band: BandQueue) -> None:
        band.remove(item)
        self.queued -= 1
        self.queued_bytes -= item.size
        if self.budget is not None:
            self.budget.release(item.size)
        if band.count == 0 and self.bands.get(band.priority) is band:
            del self.bands[band.priority]

    def _finish(self, item: QueueItem, band: BandQueue, outcome: str, error: EppError) -> None:
        self._take(item, band)
        self._outcome(item.request, outcome, monotonic() - item.enqueued_at)
        if not item.future.done():
            item.future.set_exception(error)

    def _release(self, item: QueueItem, band: BandQueue, outcome: str) -> None:
        self._take(item, band)
        self._outcome(item.request, outcome, monotonic() - item.enqueued_at)
        if not item.future.done():
            item.future.set_result(None)

    def _outcome(self, request: InferenceRequest, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.outcome(request, outcome, seconds)

    def _waiting_at_or_above(self, priority: int) -> bool:
        return any(b.count for p, b in self.bands.items() if p >= priority)

    def _has_room(self, priority: int, candidates: Sequence[Endpoint]) -> bool:
        """The candidates' saturation, plus the room the usage-limit policy keeps free for higher bands (in
        requests, converted at the saturation one request in flight adds), is below the band's ceiling."""
        cfg, fc = self.config, self.flow_control
        assert cfg is not None
        saturation = cfg.detector.saturation(candidates)
        reserve = fc.usage_limit.reserve(priority, self.demand) if fc is not None and fc.usage_limit else 0.0
        if reserve > 0:
            inflight = sum(e.inflight_requests for e in candidates)
            if inflight:
                saturation += reserve * saturation / inflight
        return saturation < self._ceiling(priority)

    def _ceiling(self, priority: int) -> float:
        fc = self.flow_control
        if fc is None or fc.usage_limit is None:
            return 1.0
        return fc.usage_limit.ceiling(priority, self.active_priorities())

    def active_priorities(self) -> list[int]:
        """Priority levels with a request in the last ``ACTIVE_WINDOW`` seconds or one waiting, highest first."""
        horizon = monotonic() - ACTIVE_WINDOW
        for p in [p for p, t in self._seen.items() if t < horizon and p not in self.bands]:
            del self._seen[p]
        return sorted(set(self._seen) | set(self.bands), reverse=True)

    def pool_saturation(self) -> float:
        """The detector's value over the whole pool (0 before a configuration is loaded)."""
        cfg = self.config
        return cfg.detector.saturation(self.director.pool.endpoints) if cfg is not None else 0.0

    # -- the dispatch loop --------------------------------------------------------------------

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="epp-flow-control")
        else:
            self._wakeup()

    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        try:
            while self.queued:
                now = monotonic()
                if now >= self._next_sweep:
                    self._next_sweep = now + SWEEP
                    self._sweep(now)
                wake.clear()
                await self._dispatch()
                if not self.queued:
                    break
                if not wake.is_set():
                    try:
                        async with asyncio.timeout(POLL):
                            await wake.wait()
                    except TimeoutError:
                        pass
        except Exception:  # a bug must not leave requests held: the next enqueue starts a new loop
            log.exception("flow-control dispatch loop failed")
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _next(self, fc: FlowControlConfig) -> tuple[QueueItem, BandQueue] | None:
        waiting = [p for p, b in self.bands.items() if b.count]
        if not waiting:
            return None
        band = self.bands[max(waiting)]
        item = fc.band(band.priority).fairness.select(band)  # type: ignore[union-attr]
        return (item, band) if item is not None else None

    async def _dispatch(self) -> None:
        """Release waiting requests, best first, while their candidates are below saturation."""
        director = self.director
        while self.queued:
            cfg, fc = self.config, self.flow_control
            if cfg is None or fc is None or not director.pool.endpoints:
                return  # no endpoint: hold (noEndpointRequestTTL bounds the wait)
            found = self._next(fc)
            if found is None:
                return
            item, band = found
            try:
                candidates = director.candidates(item.subset, model=item.request.path_model)
            except EppError as e:  # its subset matches nothing any more
                self._finish(item, band, "RejectedNoEndpoints", e)
                continue
            if not self._has_room(band.priority, candidates):
                return
            self._release(item, band, "Dispatched")
            fc.band(band.priority).fairness.dispatched(band, item)  # type: ignore[union-attr]
            await asyncio.sleep(0)  # its task schedules it now: the next saturation check counts it

    def _sweep(self, now: float) -> None:
        fc = self.flow_control
        if fc is None:
            return
        no_endpoints = not self.director.pool.endpoints
        for band in list(self.bands.values()):
            for item in list(band.items()):
                ttl = fc.no_endpoint_ttl if no_endpoints else item.ttl
                waited = now - item.enqueued_at
                if ttl <= 0 or waited < ttl:
                    continue
                if no_endpoints:
                    self._finish(item, band, "EvictedNoEndpoints", EppError(
                        503, "rejected-no-endpoints", f"no endpoint became available within {ttl:g}s "
                        "(noEndpointRequestTTL)"))
                else:
                    self._finish(item, band, "EvictedTTL", EppError(
                        503, "rejected-ttl-expired", f"request timed out in queue after {ttl:g}s"))

    def queued_for(self, model: str) -> int:
        """Requests for ``model`` (the served model a /<model>/ prefix selected, else the body's after rewrite)
        that flow control holds: ``GET /<model>/status`` counts them with those held for a wake."""
        return sum(1 for b in list(self.bands.values()) for item in b.items()
                   if (item.request.path_model or item.request.target_model) == model)

    def describe(self) -> dict[str, Any]:
        """For /debug: what waits, per band and flow."""
        return {"enabled": self.flow_control is not None, "queued": self.queued, "queued_bytes": self.queued_bytes,
                "bands": {str(p): {"count": b.count, "bytes": b.bytes,
                                   "flows": {f: q.count for f, q in list(b.flows.items())[:20]}}
                          for p, b in sorted(self.bands.items(), reverse=True)}}
