"""Wake-on-request for model servers in vLLM's sleep mode.

An endpoint whose engine reports it sleeps (``vllm:engine_sleep_state``, read by the scraper into
``EndpointMetrics.sleeping``) is not a routing candidate. When a request finds none of its candidates awake,
EPP wakes one (``POST /wake_up`` on its serving port, which returns once the engine can serve) and holds the
request until then; every request arriving meanwhile waits on the same wake. The woken endpoint is marked
awake at once (the next scrape confirms it). A wake that fails or takes longer than ``--wake-timeout`` answers
every waiting request 503 ``wake-failed`` in its API's envelope. Waking needs no configuration: it happens
whenever endpoints report that they sleep.

The endpoint woken: the one whose wake is already under way, else the one with the fewest requests EPP
routed to it, in pool order. Counted in ``epp_wakes_total{result}``; ``epp_endpoint_sleeping`` per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from epp.api.errors import EppError
from epp.datalayer.endpoint import Endpoint

if TYPE_CHECKING:
    from epp.director import Director

log = logging.getLogger(__name__)

DEFAULT_WAKE_TIMEOUT = 60.0


class Waker:
    def __init__(self, director: Director, timeout: float = DEFAULT_WAKE_TIMEOUT, metrics: Any = None) -> None:
        self.director = director
        self.timeout = timeout
        self._waking: dict[Endpoint, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.wakes = None
        if metrics is not None:
            from prometheus_client import Counter

            self.wakes = Counter("epp_wakes", "Sleeping endpoints EPP woke for a request, by result.", ["result"],
                                 registry=metrics.registry)
            for result in ("success", "failure"):
                self.wakes.labels(result)

    async def ensure_awake(self, subset: Sequence[str] | None) -> None:
        """Return once the request's candidates include an awake endpoint (waking one if need be)."""
        pool = self.director.pool.endpoints
        if not pool or not any(e.metrics.sleeping for e in pool):
            return  # the common case: nothing sleeps
        endpoints = self.director.candidates(subset, awake_only=False)
        if any(not e.asleep for e in endpoints):
            return
        target = next((e for e in endpoints if e in self._waking), None) or \
            min(endpoints, key=lambda e: e.inflight_requests)
        task = self._waking.get(target)
        if task is None:
            task = self._waking[target] = asyncio.get_running_loop().create_task(self._wake(target),
                                                                                 name=f"wake {target.name}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # waiters may all have left
        try:
            await asyncio.shield(task)
        except Exception as e:  # the wake failed or timed out: every request waiting on it gets the same answer
            raise EppError(503, "wake-failed", f"the model server was asleep and could not be woken: {e}") from None

    async def _wake(self, ep: Endpoint) -> None:
        t0 = time.monotonic()
        try:
            session = self._session
            if session is None or session.closed:
                session = self._session = aiohttp.ClientSession()
            async with asyncio.timeout(self.timeout), session.post(f"http://{ep.hostport}/wake_up") as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{ep.name} answered POST /wake_up with HTTP {resp.status}")
        except TimeoutError:
            self._count("failure")
            log.warning("wake of %s timed out after %gs", ep.name, self.timeout)
            raise RuntimeError(f"{ep.name} did not wake within {self.timeout:g}s") from None
        except Exception as e:
            self._count("failure")
            log.warning("wake of %s failed: %s", ep.name, e)
            raise RuntimeError(str(e) or type(e).__name__) from None
        finally:
            self._waking.pop(ep, None)
        ep.metrics.sleeping = False
        ep.metrics.woken_at = time.monotonic()
        self._count("success")
        log.info("woke %s for a request in %.2fs", ep.name, time.monotonic() - t0)

    def _count(self, result: str) -> None:
        if self.wakes is not None:
            self.wakes.labels(result).inc()

    async def close(self) -> None:
        for task in list(self._waking.values()):
            task.cancel()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
