"""OpenTelemetry tracing, off unless asked for: ``--tracing``, or an OTLP endpoint in the environment
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``--tracing=false`` wins).

One server span ``gateway.request`` per request, from its first header to the end of its response,
with a ``gateway.request_orchestration`` child covering the scheduling (GIE's span names). The
decision is on the span as attributes. An incoming W3C ``traceparent`` (and ``tracestate``) is
continued, and the request span's own context is sent upstream in the request-headers mutation, so
the model server's spans join the same trace.

The ``opentelemetry`` packages are imported only when tracing is on: EPP without tracing pays
nothing, and does not need them installed (``pip install 'epp[tracing]'``). The standard
``OTEL_*`` variables apply (service name, sampler, exporter endpoint, headers, protocol
``grpc`` or ``http/protobuf``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

from epp.observability.decisions import record_path

log = logging.getLogger(__name__)

REQUEST_SPAN = "gateway.request"
ORCHESTRATION_SPAN = "gateway.request_orchestration"
_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_wanted(flag: bool | None, env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    env = os.environ if env is None else env
    if flag is not None:
        return flag
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
        return False
    return any(env.get(k) for k in _ENDPOINT_ENV)


def _epoch_ns(monotonic: float) -> int:
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class Tracing:
    """Spans for requests, on an SDK ``TracerProvider`` (tests give one with an in-memory exporter)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._status_cls, self._code = Status, StatusCode
        self.provider = provider
        self.tracer = provider.get_tracer("epp")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls, service_name: str = "epp") -> Tracing | None:
        """The OTLP exporter the ``OTEL_*`` variables describe; None (and an error logged) if the
        packages are missing."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
            if protocol.startswith("http"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            log.error("tracing requested but OpenTelemetry is not installed (pip install 'epp[tracing]'): %s; "
                      "running without tracing", e)
            return None
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        endpoint = next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), "the OTLP default")
        log.info("tracing on: spans exported over OTLP/%s to %s", protocol, endpoint)
        return cls(provider)

    # -- spans --------------------------------------------------------------------------------

    def start_request(self, request: Any, decision: Any, record: dict[str, Any],
                      explanation: dict[str, Any] | None, schedule_seconds: float) -> tuple[Any, dict[str, str]]:
        """Open the request span (backdated to the request's arrival) and return it with the headers
        that carry its context upstream."""
        parent = self.propagator.extract(request.headers)
        primary = decision.endpoints[0]
        attrs: dict[str, Any] = {
            "http.request.method": request.method, "url.path": record_path(request.path),
            "gen_ai.request.model": request.model, "epp.request_id": request.request_id,
            "epp.model.target": request.target_model, "epp.priority": request.priority,
            "epp.decision.endpoint": primary.hostport, "epp.decision.endpoint_name": primary.name,
            "epp.decision.profile": decision.result.primary_profile,
            "epp.decision.candidates": record.get("candidates", 0),
            "epp.scheduling.duration_s": schedule_seconds,
        }
        if request.objective:
            attrs["epp.objective"] = request.objective
        if len(decision.endpoints) > 1:
            attrs["epp.decision.fallbacks"] = [e.hostport for e in decision.endpoints[1:]]
        if explanation is not None:
            if explanation.get("margin") is not None:
                attrs["epp.decision.margin"] = explanation["margin"]
            attrs["epp.decision.scores"] = json.dumps(explanation["scores"], separators=(",", ":"))
        start = _epoch_ns(request.received_at) if request.received_at else None
        span = self.tracer.start_span(REQUEST_SPAN, context=parent, kind=self._kind, attributes=attrs,
                                      start_time=start)
        ctx = self._trace.set_span_in_context(span)
        end = time.time_ns()
        child = self.tracer.start_span(ORCHESTRATION_SPAN, context=ctx,
                                       start_time=end - int(schedule_seconds * 1e9),
                                       attributes={"epp.decision.endpoint": primary.hostport})
        child.end(end_time=end)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=ctx)
        return span, carrier

    def finish_request(self, span: Any, response: Any) -> None:
        span.set_attribute("http.response.status_code", response.status)
        span.set_attribute("epp.response.bytes", response.bytes)
        span.set_attribute("epp.response.completed", response.completed)
        if response.served_endpoint:
            span.set_attribute("epp.response.served_endpoint", response.served_endpoint)
        u = response.usage
        if u is not None:
            if u.prompt_tokens is not None:
                span.set_attribute("gen_ai.usage.input_tokens", u.prompt_tokens)
            if u.completion_tokens is not None:
                span.set_attribute("gen_ai.usage.output_tokens", u.completion_tokens)
        if response.status >= 500 or not response.completed:
            span.set_status(self._status_cls(self._code.ERROR, "upstream error" if response.status >= 500
                                             else "response did not complete"))
        span.end()

    def rejected(self, request: Any, status: int, reason: str, message: str) -> None:
        parent = self.propagator.extract(request.headers) if request is not None else None
        attrs: dict[str, Any] = {"http.response.status_code": status, "error.type": reason}
        if request is not None:
            attrs.update({"http.request.method": request.method, "url.path": record_path(request.path),
                          "gen_ai.request.model": request.model, "epp.request_id": request.request_id})
        start = _epoch_ns(request.received_at) if request is not None and request.received_at else None
        span = self.tracer.start_span(REQUEST_SPAN, context=parent, kind=self._kind, attributes=attrs,
                                      start_time=start)
        span.set_status(self._status_cls(self._code.ERROR, message[:200]))
        span.end()

    async def shutdown(self, timeout: float = 3.0) -> None:
        """Flush what is buffered, then stop the exporter (off the event loop: it blocks)."""
        def close() -> None:
            self.provider.force_flush(int(timeout * 1000))
            self.provider.shutdown()

        try:
            await asyncio.wait_for(asyncio.to_thread(close), timeout + 1)
        except Exception as e:  # a dead collector must not hold up the exit
            log.warning("tracing shutdown: %s", e)
