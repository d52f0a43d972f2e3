"""What EPP tells about each request: the decision log, explanations, spans and log lines.

The director calls ``RequestHooks`` at three points of a request's life: ``routed`` (the pick is
made), ``rejected`` (EPP answered the request itself) and ``completed`` (exactly once per routed
request). ``routed`` returns nothing but hangs a ``DecisionExtras`` on the decision: the headers
and ``envoy.lb`` metadata the ext_proc stream adds to its answers (trace context upstream, the
explanation in metadata and in the ``x-epp-decision`` response header).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from epp.datalayer.pool import EndpointPool
from epp.observability.decisions import DEFAULT_SIZE, DecisionLog, record_path
from epp.observability.explain import (
    DECISION_KEY,
    DECISION_RESPONSE_HEADER,
    EXPLAIN_HEADER,
    SCORES_KEY,
    ExplainPolicy,
    explain,
    header_value,
)
from epp.observability.metrics import EppMetrics
from epp.observability.tracing import Tracing

if TYPE_CHECKING:
    from epp.api.errors import EppError
    from epp.api.types import InferenceRequest
    from epp.director import Decision
    from epp.scheduling.plugins import ResponseInfo

log = logging.getLogger("epp.decisions")


@dataclass(slots=True)
class DecisionExtras:
    """Additions to the ext_proc answers for one request, and its observability state."""

    record: dict[str, Any]
    request_headers: dict[str, str] = field(default_factory=dict)  # set on the upstream request
    remove_headers: list[str] = field(default_factory=list)  # removed from the upstream request
    response_headers: dict[str, str] = field(default_factory=dict)  # set on the response to the client
    metadata: dict[str, Any] = field(default_factory=dict)  # added to the envoy.lb dynamic metadata
    span: Any = None


class Throttle:
    """At most one log line per key per ``every`` seconds; says how many were held back."""

    def __init__(self, every: float = 10.0, max_keys: int = 256) -> None:
        self.every = every
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str) -> int | None:
        """None: hold this one back; else the number held back since the last line."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._last) >= self.max_keys and key not in self._last:
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


def _weights(config: Any, profile: str) -> dict[str, float]:
    try:
        return {s.name: w for s, w in config.scheduler.profiles[profile].scorers}
    except (AttributeError, KeyError):
        return {}


class RequestHooks:
    def __init__(self, pool: EndpointPool, metrics: EppMetrics | None = None, policy: ExplainPolicy | None = None,
                 tracing: Tracing | None = None, log_size: int = DEFAULT_SIZE) -> None:
        self.pool = pool
        self.metrics = metrics
        self.policy = policy or ExplainPolicy()
        self.tracing = tracing
        self.decisions = DecisionLog(log_size, pool)
        self.throttle = Throttle()

    def wants_explain(self, request: InferenceRequest) -> bool:
        return self.policy.allows(request.headers)

    # Never let observability fail a request: each hook logs its own exception and returns.

    def routed(self, request: InferenceRequest, decision: Decision, schedule_seconds: float, config: Any,
               candidates: int = 0) -> None:
        try:
            self._routed(request, decision, schedule_seconds, config, candidates)
        except Exception:
            log.exception("recording the decision for request %s failed", request.request_id)

    def rejected(self, request: InferenceRequest | None, err: EppError) -> None:
        try:
            self._rejected(request, err)
        except Exception:
            log.exception("recording a rejection failed")

    def completed(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        try:
            self._completed(request, decision, response)
        except Exception:
            log.exception("recording the end of request %s failed", request.request_id)

    def _routed(self, request: InferenceRequest, decision: Decision, schedule_seconds: float, config: Any,
                candidates: int) -> None:
        primary = decision.endpoints[0]
        result = decision.result
        pr = result.profile_results.get(result.primary_profile)
        explanation = None
        if pr is not None and pr.scores:
            explanation = explain(result, _weights(config, result.primary_profile), primary.name)
        record: dict[str, Any] = {
            "t": DecisionLog.now(), "id": request.request_id, "model": request.model, "path": record_path(request.path),
            "endpoint": primary.name, "dest": primary.hostport,
            "candidates": candidates or (explanation["candidates"] if explanation else None),
            "profile": result.primary_profile, "sched_us": round(schedule_seconds * 1e6, 1)}
        if request.target_model != request.model:
            record["target"] = request.target_model
        if len(decision.endpoints) > 1:
            record["fallbacks"] = [e.name for e in decision.endpoints[1:]]
        extras = DecisionExtras(record)
        if result.disagg is not None:  # P/D: the decode pod is the pick above; the prefill pod, when split
            record["pd"] = dict(result.disagg)
            if result.prefill is not None:
                record["pd"]["prefill_dest"] = result.prefill.hostport
        if EXPLAIN_HEADER in request.headers:
            extras.remove_headers.append(EXPLAIN_HEADER)
        if explanation is not None:
            record["margin"] = explanation["margin"]
            record["explanation"] = explanation
            extras.response_headers[DECISION_RESPONSE_HEADER] = header_value(explanation)
            scores = {}
            for name, entry in explanation["scores"].items():
                ep = self.pool.get(name)
                scores[ep.hostport if ep is not None else name] = entry["total"]
            extras.metadata[SCORES_KEY] = scores
            extras.metadata[DECISION_KEY] = explanation
            if self.metrics is not None and explanation["margin"] is not None:
                self.metrics.decision_margin.observe(explanation["margin"])
        self.decisions.add(record)
        if self.tracing is not None:
            try:
                extras.span, carrier = self.tracing.start_request(request, decision, record, explanation,
                                                                  schedule_seconds)
                extras.request_headers.update(carrier)
            except Exception:
                log.exception("tracing failed for request %s", request.request_id)
        decision.extras = extras
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s model=%s routed to %s (%s) profile=%s in %.0fus%s", request.request_id,
                      request.model, primary.name, primary.hostport, result.primary_profile, schedule_seconds * 1e6,
                      f" margin={explanation['margin']}" if explanation else "", extra={"fields": record})

    def _rejected(self, request: InferenceRequest | None, err: EppError) -> None:
        record: dict[str, Any] = {"t": DecisionLog.now(), "id": request.request_id if request else None,
                                  "model": request.model if request else None, "rejected": err.reason,
                                  "status": err.status}
        self.decisions.add_rejection(record)
        if err.status >= 500 or err.status == 429:
            held = self.throttle(f"reject:{err.reason}")
            if held is not None:
                log.warning("request %s answered %d %s: %s%s", record["id"] or "-", err.status, err.reason,
                            err.message, f" ({held} more since the last line)" if held else "",
                            extra={"fields": record})
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("request %s answered %d %s: %s", record["id"] or "-", err.status, err.reason, err.message,
                      extra={"fields": record})
        if self.tracing is not None:
            try:
                self.tracing.rejected(request, err.status, err.reason, err.message)
            except Exception:
                log.exception("tracing failed for a rejected request")

    def _completed(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        extras: DecisionExtras | None = getattr(decision, "extras", None)
        if extras is None:
            return
        rec = extras.record
        rec["status"] = response.status
        rec["duration_s"] = round(time.monotonic() - request.received_at, 4) if request.received_at else None
        if response.usage is not None:
            rec["tokens_in"] = response.usage.prompt_tokens
            rec["tokens_out"] = response.usage.completion_tokens
            if response.usage.cached_tokens is not None:
                rec["tokens_cached"] = response.usage.cached_tokens
        if response.outcome not in (None, "completed"):  # Responses API: "failed" or "incomplete"
            rec["outcome"] = response.outcome
        if not response.completed or response.status >= 500 or response.status == 0:
            rec["failed"] = True
            held = self.throttle(f"upstream:{decision.endpoints[0].name}")
            if held is not None:
                log.log(logging.WARNING if response.status >= 500 else logging.INFO,
                        "request %s to %s ended %s (status %d)%s", request.request_id, decision.endpoints[0].name,
                        "normally" if response.completed else "abnormally", response.status,
                        f" ({held} more since the last line)" if held else "", extra={"fields": rec})
        if extras.span is not None:
            try:
                self.tracing.finish_request(extras.span, response)  # type: ignore[union-attr]
            except Exception:
                log.exception("tracing failed for request %s", request.request_id)
            extras.span = None
