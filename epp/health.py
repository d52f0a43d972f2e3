"""gRPC health on --grpc-health-port, answered as GIE's EPP does.

``liveness`` is SERVING while the process answers. Every other service name (``readiness``, ``""``,
``envoy.service.ext_proc.v3.ExternalProcessor``, anything) is SERVING once the endpoint pool is
synced, and NOT_SERVING before that and while draining.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, ready: Callable[[], bool] = lambda: False) -> None:
        self.ready = ready  # e.g. pool synced and (with leader election) leading
        self.draining = False

    def status(self, service: str) -> int:
        if service == "liveness":
            return _SERVING
        return _SERVING if not self.draining and self.ready() else _NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self.status(request.service))
