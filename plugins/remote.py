"""``remote-scorer``: a scorer in another process, over gRPC (proto/epp/remote/v1/scorer.proto).

Before scheduling (``RequestPreparer``) it sends the request's features and the candidate endpoints with their
metrics, with a deadline (``timeout``, default 50ms); scoring then reads the answer. When the service is slow,
failing or down, every endpoint scores ``fallbackScore`` alike, so the other scorers of the profile decide:
routing goes on. After a failure the service is left alone for ``backoff`` (default 1s, one probe at a time),
so a dead service costs no request its deadline. ``epp_remote_scorer_calls_total{plugin,outcome}`` counts
``ok`` / ``timeout`` / ``error`` / ``skipped`` (backing off) calls; ``epp_remote_scorer_seconds`` their latency.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

from epp.plugin import (
    DataKey,
    Endpoint,
    InferenceRequest,
    Scorer,
    check_duration,
    check_float,
    check_int,
    check_str,
    register_plugin,
)
from epp.remote.v1 import scorer_pb2
from epp.scheduling.plugins import RequestPreparer

METHOD = "/epp.scorer.v1.Scorer/Score"
OUTCOMES = ("ok", "timeout", "error", "skipped")
REMOTE_SCORES: DataKey[dict[str, float]] = DataKey("remote-scores", dict, "endpoint name -> remote score")


def score_request(request: InferenceRequest, endpoints: Sequence[Endpoint], headers: Sequence[str],
                  prompt_chars: int, config: Mapping[str, str]) -> scorer_pb2.ScoreRequest:
    body = request.body
    text = body.prompt_text or ""
    now = time.monotonic()
    msg = scorer_pb2.ScoreRequest(config=dict(config))
    r = msg.request
    r.request_id, r.api, r.model, r.target_model = request.request_id, str(request.api), body.model, \
        request.target_model or body.model
    r.prompt_prefix, r.prompt_chars = text[:prompt_chars], len(text)
    r.prompt_token_ids = len(body.prompt_token_ids or ())
    r.max_output_tokens, r.stream = body.max_output_tokens or 0, body.stream
    r.objective, r.priority = request.objective or "", request.priority
    for h in headers:
        if h in request.headers:
            r.headers[h] = request.headers[h]
    for e in endpoints:
        out = msg.endpoints.add(name=e.name, address=e.address, port=e.port, inflight_requests=e.inflight_requests,
                                inflight_tokens=e.inflight_tokens)
        out.labels.update(e.labels)
        m = e.metrics
        om = out.metrics
        om.waiting_requests, om.running_requests, om.kv_cache_usage = m.waiting_requests, m.running_requests, \
            m.kv_cache_usage
        om.active_models.extend(sorted(m.active_models))
        om.age_seconds = now - m.updated_at if m.updated_at else -1.0
    return msg


@register_plugin("remote-scorer")
class RemoteScorer(RequestPreparer, Scorer):
    produces = (REMOTE_SCORES,)

    def __init__(self, address: str = "", timeout: Any = "50ms", fallback_score: Any = 0.0, backoff: Any = "1s",
                 forward_headers: Sequence[str] | None = None, prompt_chars: Any = 0,
                 config: Mapping[str, Any] | None = None) -> None:
        self.address = check_str(address, "address")
        self.timeout = check_duration(timeout, "timeout")
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.fallback = check_float(fallback_score, "fallbackScore", 0.0, 1.0)
        self.backoff = check_duration(backoff, "backoff")
        if forward_headers is not None and not (isinstance(forward_headers, list)
                                                and all(isinstance(h, str) for h in forward_headers)):
            raise ValueError("forwardHeaders must be a list of header names")
        self.headers = tuple(h.lower() for h in forward_headers or ())
        self.prompt_chars = check_int(prompt_chars, "promptChars", 0, 1 << 20)
        if config is not None and not isinstance(config, Mapping):
            raise ValueError("config must be a mapping")
        self.config = {str(k): str(v) for k, v in (config or {}).items()}
        self.calls = dict.fromkeys(OUTCOMES, 0)
        self.seconds = 0.0  # summed latency of the calls made
        self._down_until = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None

    def start(self) -> None:
        if self._channel is None:  # kept across a reload with the same parameters: keep the channel too
            self._channel = grpc.aio.insecure_channel(self.address)
            self._call = self._channel.unary_unary(METHOD, request_serializer=scorer_pb2.ScoreRequest.SerializeToString,
                                                   response_deserializer=scorer_pb2.ScoreResponse.FromString)

    def stop(self) -> None:
        self._channel = self._call = None  # grpc.aio closes it when collected; close() needs the loop

    async def prepare_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        if self._call is None or not endpoints:
            return
        now = time.monotonic()
        if now < self._down_until:
            self.calls["skipped"] += 1
            return
        msg = score_request(request, endpoints, self.headers, self.prompt_chars, self.config)
        try:
            answer = await self._call(msg, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            outcome = "timeout" if e.code() is grpc.StatusCode.DEADLINE_EXCEEDED else "error"
            self._down_until = time.monotonic() + self.backoff
        else:
            outcome = "ok"
            REMOTE_SCORES.put(request, dict(answer.scores))
        self.calls[outcome] += 1
        self.seconds += time.monotonic() - now

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        scores = REMOTE_SCORES.get(request)
        if scores is None:
            return [self.fallback] * len(endpoints)
        fallback = self.fallback
        return [scores.get(e.name, fallback) for e in endpoints]

    def metric_families(self) -> list[Any]:
        calls = CounterMetricFamily("epp_remote_scorer_calls", "Calls to a remote scorer, by outcome (skipped: "
                                    "backing off after a failure).", labels=["plugin", "outcome"])
        for outcome, n in self.calls.items():
            calls.add_metric([self.name, outcome], n)
        made = sum(n for o, n in self.calls.items() if o != "skipped")
        latency = SummaryMetricFamily("epp_remote_scorer_seconds", "Latency of the calls made to a remote scorer.",
                                      labels=["plugin"])
        latency.add_metric([self.name], made, self.seconds)
        return [calls, latency]
