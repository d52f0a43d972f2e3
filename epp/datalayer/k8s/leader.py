"""Active-passive leader election over a ``coordination.k8s.io/v1`` Lease (client-go's algorithm).

Every replica runs discovery (so a standby is warm); only the leader reports ready. A lease held by
someone else counts as expired once we have seen the same record, unchanged, for ``lease_duration``
by our own clock (never by comparing the holder's timestamps with ours: clocks differ). The leader
renews every ``retry_period`` and steps down when it has not renewed for ``renew_deadline``; on stop
it releases the lease so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from epp.datalayer.k8s.reflector import ApiError, Timings
from epp.tasks import stop_task

log = logging.getLogger(__name__)


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, timings: Timings) -> None:
        self.api = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.t = timings
        self._renewed_at = 0.0  # monotonic time of our last successful acquire/renew
        self._leading = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def is_leader(self) -> bool:
        return self._leading and time.monotonic() - self._renewed_at < self.t.renew_deadline

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        if self._leading:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._release(), self.t.retry_period)
        self._leading = False

    async def _run(self) -> None:
        while True:
            try:
                ok = await self._try_acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError, ValueError) as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok = False
            except Exception:
                log.exception("lease %s/%s: unexpected error", self.namespace, self.name)
                ok = False
            now = time.monotonic()
            if ok:
                if not self._leading:
                    log.info("lease %s/%s: %s is now the leader", self.namespace, self.name, self.identity)
                self._leading = True
                self._renewed_at = now
            elif self._leading and now - self._renewed_at >= self.t.renew_deadline:
                log.warning("lease %s/%s: could not renew for %.1fs, stepping down", self.namespace, self.name,
                            self.t.renew_deadline)
                self._leading = False
            # Standbys add jitter so they do not all knock at the same instant (client-go: JitterFactor 1.2).
            await asyncio.sleep(self.t.retry_period * (1.0 if self._leading else random.uniform(1.0, 1.2)))

    async def _call(self, coro: Any) -> tuple[int, dict[str, Any]]:
        resp = await coro
        try:
            body = await resp.read()
        finally:
            resp.release()
        doc = json.loads(body) if body else {}
        return resp.status, doc

    def _opts(self) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": aiohttp.ClientTimeout(total=self.t.renew_deadline)}

    def _record(self, holder: str, acquire_time: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": holder, "leaseDurationSeconds": max(1, round(self.t.lease_duration)),
                "acquireTime": acquire_time, "renewTime": _now_micro(), "leaseTransitions": transitions}

    async def _try_acquire_or_renew(self) -> bool:
        lease: Any  # plain JSON dicts: kubernetes-asyncio serialises them as they are
        status, lease = await self._call(self.api.read_namespaced_lease(self.name, self.namespace, **self._opts()))
        if status == 404:
            body: Any = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._record(self.identity, _now_micro(), 0)}
            status, _ = await self._call(self.api.create_namespaced_lease(self.namespace, body, **self._opts()))
            if status == 409:  # another replica created it first
                return False
            if status >= 300:
                raise ApiError(status, "create lease")
            return True
        if status != 200:
            raise ApiError(status, "read lease")
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.t.lease_duration)
        if holder and holder != self.identity and now - self._observed_at < duration:
            return False  # someone else holds a lease that has not expired by our clock
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            acquire = spec.get("acquireTime") or _now_micro()
        else:
            acquire = _now_micro()
            transitions += 1
        lease["spec"] = {**spec, **self._record(self.identity, acquire, transitions)}
        # The resourceVersion in metadata makes this a compare-and-swap: 409 if someone wrote in between.
        status, _ = await self._call(self.api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                                       **self._opts()))
        if status == 409:
            return False
        if status >= 300:
            raise ApiError(status, "update lease")
        return True

    async def _release(self) -> None:
        lease: Any
        status, lease = await self._call(self.api.read_namespaced_lease(self.name, self.namespace, **self._opts()))
        if status != 200 or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _now_micro()}
        status, _ = await self._call(self.api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                                       **self._opts()))
        if status < 300:
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
