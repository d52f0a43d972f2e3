"""gRPC health (``grpc.health.v1.Health``) on --grpc-health-port and on the ext_proc port, as GIE's EPP.

States and answers:

============  ==========  ===================================================================
state         liveness    readiness, "", envoy.service.ext_proc.v3.ExternalProcessor, any name
============  ==========  ===================================================================
starting      SERVING     NOT_SERVING (the pool is not synced yet, or not the leader)
serving       SERVING     SERVING
draining      SERVING     NOT_SERVING (after SIGTERM: proxies move away, streams still served)
============  ==========  ===================================================================

As GIE without leader election, the service name is not checked: every name but ``liveness``
answers readiness (GIE's Helm chart probes ``inference-extension`` with one replica). With leader
election (``strict_names``), as GIE, a name other than the four above answers SERVICE_UNKNOWN.
``liveness`` stays SERVING while draining so that Kubernetes does not kill a pod finishing its streams.

``Watch`` streams the status of a service: the current one at once, then each change (readiness is
re-evaluated at least every ``WATCH_POLL`` seconds, drain and shutdown are pushed at once). ``List``
reports the three named services.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
LIVENESS = "liveness"
READINESS = "readiness"
SERVICES = (LIVENESS, READINESS, "", EXT_PROC_SERVICE)
WATCH_POLL = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool] = lambda: False, strict_names: bool = False) -> None:
        self.ready = ready  # e.g. pool synced and (with leader election) leading
        self.strict_names = strict_names  # unknown service names answer SERVICE_UNKNOWN (GIE with leader election)
        self.named: dict[str, Callable[[], bool]] = {}  # more readiness services, e.g. pool/<name> (epp.pools)
        self._draining = False
        self._closed = False
        self._changed: asyncio.Event | None = None
        # Probes answered NOT_SERVING since the drain began: proof that someone was told to move away.
        self.not_serving_answers = 0

    # -- state --------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if value != self._draining:
            self._draining = value
            self.not_serving_answers = 0
            self._notify()

    @property
    def state(self) -> str:
        if self._draining:
            return "draining"
        return "serving" if self._ready() else "starting"

    def _ready(self) -> bool:
        return _safe(self.ready)

    def status(self, service: str) -> int:
        if service == LIVENESS:
            return _SERVING
        check = self.named.get(service)
        if check is not None:
            return _SERVING if not self._draining and _safe(check) else _NOT_SERVING
        if self.strict_names and service not in SERVICES:
            return _UNKNOWN
        return _SERVING if not self._draining and self._ready() else _NOT_SERVING

    def answer(self, service: str) -> int:
        """A probe's answer; NOT_SERVING answers while draining are counted."""
        s = self.status(service)
        if self._draining and s == _NOT_SERVING:
            self.not_serving_answers += 1
        return s

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        """End every Watch stream (the server is stopping; they would hold up its grace period)."""
        self._closed = True
        self._notify()

    # -- RPCs ---------------------------------------------------------------------------------

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self.answer(request.service))

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while not self._closed:
            status = self.answer(request.service)
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), WATCH_POLL)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return self.list_statuses(request)

    def list_statuses(self, request: health_pb2.HealthListRequest) -> health_pb2.HealthListResponse:
        resp = health_pb2.HealthListResponse()
        for name in (LIVENESS, READINESS, EXT_PROC_SERVICE):
            resp.statuses[name].status = self.status(name)
        return resp


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
