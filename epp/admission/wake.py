"""Sleeping models: wake-on-request, an accelerator budget shared least-recently-used first, and sleep behind a
drain barrier -- driving vLLM's sleep mode (``POST /sleep?level=1|2``, ``POST /wake_up``).

Routing. An endpoint whose engine reports it sleeps (``vllm:engine_sleep_state``, scraped into
``EndpointMetrics.sleeping``) is not a routing candidate, nor is one EPP is putting to sleep (draining).

Wake. When a request finds none of its candidates awake, EPP wakes one (the one already waking, else the sleeping
one with the fewest requests in flight) and holds the request, with every request arriving meanwhile, until it
serves. When the endpoint's accelerator has no room (``epp.admission.accelerator``), the least-recently-used awake
endpoints there are put to sleep first; one activation per accelerator at a time. Past ``--wake-timeout`` every
request waiting gets 503 ``wake-failed`` in its API's envelope. Waking needs no configuration: it happens whenever
endpoints report that they sleep.

Sleep. EPP puts an endpoint to sleep when another model needs its room on the accelerator, or after
``--sleep-idle-time`` with no request to it and none in flight. Behind a drain barrier: from that moment it is not a
candidate, so a new request with no other endpoint gets 503 ``model-draining``, while those in flight finish; then
``POST /sleep?level=--sleep-level``. An engine that refuses to sleep (no sleep mode) is not asked again.

Per model (the endpoints serving one served model), the state ``GET /<model>/status`` reports: ``serving`` (an
endpoint awake), ``waking`` (a wake under way), ``pending`` (requests wait for a wake that waits for room),
``deactivating`` (its endpoints drain toward sleep), ``sleeping``.

Counted in ``epp_wakes_total{result}`` and ``epp_sleeps_total{reason,result}``; ``epp_endpoint_sleeping`` per
endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from epp.admission import accelerator
from epp.api.errors import EppError
from epp.config import Config
from epp.datalayer.endpoint import Endpoint

if TYPE_CHECKING:
    from epp.director import Director

log = logging.getLogger(__name__)

DRAIN_POLL = 0.02  # seconds between checks that a draining endpoint's requests finished
SLEEP_RETRIES = 25  # POST /sleep refused while the engine still has requests (not all EPP's): retry this often
SLEEP_RETRY_DELAY = 0.2


class Waker:
    def __init__(self, director: Director, timeout: float = Config.wake_timeout, metrics: Any = None) -> None:
        self.director = director
        self.timeout = timeout
        self.idle_time = 0.0  # --sleep-idle-time; 0: endpoints sleep only to make room
        self.sleep_level = Config.sleep_level  # --sleep-level
        self.budget = 0.0  # --accelerator-budget: a group's capacity when no label gives it; 0: no limit
        self.draining: dict[Endpoint, asyncio.Task[None]] = {}  # not candidates: on their way to sleep
        self._activating: dict[Endpoint, asyncio.Task[None]] = {}  # making room, then waking
        self._waking: set[Endpoint] = set()  # of those, the ones whose POST /wake_up is under way
        self._barriered: dict[str, int] = defaultdict(int)  # served model -> requests held for a wake
        self._last_used: dict[Endpoint, float] = {}  # when a request last went to or came back from it
        self._no_sleep: set[Endpoint] = set()  # refused POST /sleep: no sleep mode
        self._locks: dict[str, asyncio.Lock] = {}  # accelerator group -> one activation at a time
        self._session: aiohttp.ClientSession | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self.wakes = self.sleeps = None
        if metrics is not None:
            from prometheus_client import Counter

            self.wakes = Counter("epp_wakes", "Sleeping endpoints EPP woke for a request, by result.", ["result"],
                                 registry=metrics.registry)
            self.sleeps = Counter("epp_sleeps", "Endpoints EPP put to sleep, by reason (idle, evicted: room for "
                                  "another model on its accelerator) and result.", ["reason", "result"],
                                  registry=metrics.registry)
            for result in ("success", "failure"):
                self.wakes.labels(result)
        director.pool.add_listener(self._forget)

    def configure(self, timeout: float, idle_time: float, sleep_level: int, budget: float) -> None:
        self.timeout, self.idle_time, self.sleep_level, self.budget = timeout, idle_time, sleep_level, budget

    def start(self) -> None:
        if self.idle_time > 0 and self._idle_task is None:
            self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop(), name="epp-idle-sleep")

    # -- the request path ---------------------------------------------------------------------

    def usable(self, e: Endpoint) -> bool:
        return not e.asleep and e not in self.draining

    def touch(self, e: Endpoint) -> None:
        """A request went to ``e`` or came back from it (recency for the budget, idleness)."""
        self._last_used[e] = time.monotonic()

    async def ensure_awake(self, subset: Sequence[str] | None, model: str | None = None) -> None:
        """Return once the request's candidates include an awake endpoint (waking one if need be)."""
        director = self.director
        if not self.draining and not any(e.metrics.sleeping or e.metrics.slept_at for e in director.pool.endpoints):
            return  # the common case: nothing sleeps
        endpoints = director.candidates(subset, awake_only=False, model=model)
        if any(self.usable(e) for e in endpoints):
            return
        asleep = [e for e in endpoints if e not in self.draining]
        if not asleep:
            raise EppError(503, "model-draining", "the model is being put to sleep and has no other endpoint; "
                           "retry shortly")
        target = next((e for e in asleep if e in self._activating), None) or \
            min(asleep, key=lambda e: e.inflight_requests)
        task = self._activating.get(target)
        if task is None:
            task = self._activating[target] = asyncio.get_running_loop().create_task(
                self._activate(target), name=f"wake {target.name}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters may all have left
        key = model or ""
        self._barriered[key] += 1
        try:
            await asyncio.shield(task)
        except Exception as e:  # the wake failed or timed out: every request waiting on it gets the same answer
            raise EppError(503, "wake-failed", f"the model server was asleep and could not be woken: {e}") from None
        finally:
            self._barriered[key] -= 1
            if not self._barriered[key]:
                del self._barriered[key]

    # -- waking -------------------------------------------------------------------------------

    async def _activate(self, ep: Endpoint) -> None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                group = accelerator.group(ep)
                async with self._locks.setdefault(group, asyncio.Lock()):
                    await self._make_room(ep, group)
                    self._waking.add(ep)
                    async with self._http().post(f"http://{ep.hostport}/wake_up") as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{ep.name} answered POST /wake_up with HTTP {resp.status}")
        except TimeoutError:
            self._count(self.wakes, "failure")
            log.warning("wake of %s timed out after %gs", ep.name, self.timeout)
            raise RuntimeError(f"{ep.name} did not wake within {self.timeout:g}s") from None
        except Exception as e:
            self._count(self.wakes, "failure")
            log.warning("wake of %s failed: %s", ep.name, e)
            raise RuntimeError(str(e) or type(e).__name__) from None
        finally:
            self._activating.pop(ep, None)
            self._waking.discard(ep)
        m = ep.metrics
        m.sleeping, m.woken_at, m.slept_at = False, time.monotonic(), 0.0  # the next scrape confirms it
        self.touch(ep)
        self._count(self.wakes, "success")
        log.info("woke %s for a request in %.2fs", ep.name, time.monotonic() - t0)

    def _occupies(self, e: Endpoint) -> bool:
        return (not e.asleep and not e.metrics.unreachable) or e in self._waking

    async def _make_room(self, ep: Endpoint, group: str) -> None:
        """Put least-recently-used endpoints of ``ep``'s accelerator to sleep until ``ep`` fits its budget."""
        while True:
            members = [e for e in self.director.pool.endpoints if accelerator.group(e) == group]
            limit = accelerator.budget(members, self.budget)
            if limit <= 0:
                return
            others = [e for e in members if e is not ep and self._occupies(e)]
            if sum(map(accelerator.memory, others)) + accelerator.memory(ep) <= limit:
                return
            victims = [e for e in others if e not in self.draining and e not in self._no_sleep]
            if victims:
                victim = min(victims, key=lambda e: self._last_used.get(e, 0.0))
                log.info("accelerator %s is full: %s sleeps to make room for %s", group, victim.name, ep.name)
                await asyncio.shield(self.put_to_sleep(victim, "evicted"))
                if self._occupies(victim):
                    raise RuntimeError(f"{victim.name} could not be put to sleep to make room")
            elif draining := [self.draining[e] for e in others if e in self.draining]:
                await asyncio.shield(draining[0])  # already on its way to sleep
            else:
                raise RuntimeError(f"{ep.name} needs {accelerator.memory(ep):g} of accelerator {group}'s budget "
                                   f"{limit:g}, held by endpoints that cannot sleep")

    # -- sleeping -----------------------------------------------------------------------------

    def put_to_sleep(self, ep: Endpoint, reason: str) -> asyncio.Task[None]:
        """Start (or join) ``ep``'s drain: no new requests; once those in flight finished, POST /sleep."""
        task = self.draining.get(ep)
        if task is None:
            task = self.draining[ep] = asyncio.get_running_loop().create_task(self._drain(ep, reason),
                                                                              name=f"sleep {ep.name}")
        return task

    async def _drain(self, ep: Endpoint, reason: str) -> None:
        result = "failure"
        try:
            while ep.inflight_requests > 0:  # the barrier: those in flight finish, nothing new arrives
                await asyncio.sleep(DRAIN_POLL)
            for _ in range(SLEEP_RETRIES):
                async with self._http().post(f"http://{ep.hostport}/sleep?level={self.sleep_level}") as resp:
                    await resp.read()
                if resp.status == 200:
                    m = ep.metrics
                    m.sleeping, m.slept_at, m.woken_at = True, time.monotonic(), 0.0
                    result = "success"
                    log.info("%s sleeps (level %d, %s)", ep.name, self.sleep_level, reason)
                    return
                if resp.status != 400:  # 400: requests EPP did not route are still running there
                    break
                await asyncio.sleep(SLEEP_RETRY_DELAY)
            log.warning("%s refused POST /sleep (HTTP %d): it is no longer put to sleep", ep.name, resp.status)
            self._no_sleep.add(ep)
        except Exception as e:
            log.warning("putting %s to sleep failed: %s", ep.name, e)
        finally:
            self.draining.pop(ep, None)
            if self.sleeps is not None:
                self.sleeps.labels(reason, result).inc()

    async def _idle_loop(self) -> None:
        interval = max(0.05, min(1.0, self.idle_time / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for e in self.director.pool.endpoints:
                if e.inflight_requests:
                    self._last_used[e] = now
                    continue
                idle = now - self._last_used.setdefault(e, now)
                if idle >= self.idle_time and self.usable(e) and not e.metrics.unreachable and \
                        e not in self._activating and e not in self._no_sleep:
                    self.put_to_sleep(e, "idle")

    # -- per model ----------------------------------------------------------------------------

    def model_state(self, model: str, endpoints: Sequence[Endpoint]) -> str:
        if any(self.usable(e) for e in endpoints):
            return "serving"
        if any(e in self._waking for e in endpoints):
            return "waking"
        if any(e in self._activating for e in endpoints) or self._barriered.get(model) or not endpoints:
            return "pending"
        if any(e in self.draining for e in endpoints):
            return "deactivating"
        return "sleeping"

    def status(self, name: str, model: str) -> dict[str, Any]:
        """``GET /<model>/status``, in the shape of the per-model sidecar EPP stands in for."""
        endpoints = self.director.models.endpoints(model)
        return {"model": name, "state": self.model_state(model, endpoints),
                "bootReady": any(not e.metrics.unreachable for e in endpoints),
                "queue": {"inFlight": sum(e.inflight_requests for e in endpoints),
                          # held for a wake, or by flow control while the model's endpoints are saturated
                          "barriered": self._barriered.get(model, 0) + self.director.admission.queued_for(model)}}

    # -- plumbing -----------------------------------------------------------------------------

    def _forget(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:
            self._last_used.pop(e, None)
            self._no_sleep.discard(e)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    @staticmethod
    def _count(counter: Any, result: str) -> None:
        if counter is not None:
            counter.labels(result).inc()

    async def close(self) -> None:
        tasks = [*self._activating.values(), *self.draining.values(), *([self._idle_task] if self._idle_task else [])]
        for task in tasks:
            task.cancel()
        self._idle_task = None
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
