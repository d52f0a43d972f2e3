"""The request path's brain: candidates -> scheduler -> pick, and the lifecycle hooks around it.

The ext_proc state machine calls ``route`` once the request is parsed, then reports the response as
it streams past and, exactly once, its end. What it calls is ``epp.extproc.stream.StreamDirector``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from epp.admission.controller import Admission
from epp.admission.models import ModelPath, ModelPaths
from epp.admission.wake import Waker
from epp.api.errors import EppError
from epp.api.types import InferenceRequest
from epp.clock import monotonic  # the clock received_at is read on (epp.extproc.stream)
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool
from epp.datalayer.tokens import TokenRatios
from epp.objectives import Objectives
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import PickerConfig
from epp.scheduling.plugins import RequestObserver, RequestPreparer, ResponseInfo, SchedulingResult

if TYPE_CHECKING:
    from epp.observability.hooks import RequestHooks
    from epp.trace import TraceRecorder

log = logging.getLogger(__name__)

# A request's output counts toward its endpoint's load up to this many tokens: ``max_tokens`` is a ceiling the
# client chooses, not a size, and one absurd ceiling must not make an endpoint look full to everyone else.
MAX_OUTPUT_ESTIMATE = 1 << 17
_PRIOR = TokenRatios()  # no model learned: the default ratio


@dataclass(slots=True)
class Decision:
    endpoints: list[Endpoint]  # primary first, then fallbacks
    result: SchedulingResult
    tokens: int  # estimated tokens this request adds to the endpoint (prompt + output)
    extras: Any = None  # epp.observability.hooks.DecisionExtras: headers/metadata to add, trace span
    prefill_tokens: int = 0  # P/D: prompt tokens counted in flight on the prefill endpoint until its prefill ends

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]

    @property
    def destination(self) -> str:
        """The value of ``x-gateway-destination-endpoint``: ip:port[,ip:port...]."""
        return ",".join(e.hostport for e in self.endpoints)


def filter_subset(endpoints: Iterable[Endpoint], subset: Sequence[str]) -> list[Endpoint]:
    """Endpoints allowed by the proxy's subset hint: ``ip`` admits every port, ``ip:port`` one."""
    hosts: set[str] = set()
    exact: set[str] = set()
    for entry in subset:
        entry = entry.strip()
        if not entry:
            continue
        if entry.count(":") == 1 or entry.startswith("["):
            exact.add(entry)
        else:
            hosts.add(entry)
    return [e for e in endpoints if e.address in hosts or e.hostport in exact]


def estimate_prompt_tokens(request: InferenceRequest, ratios: TokenRatios | None = None) -> int:
    """Prompt tokens of a request: its token ids, or its text through the learned characters per token."""
    body = request.body
    if body.prompt_token_ids is not None:
        return len(body.prompt_token_ids)
    chars = len(body.prompt_text) if body.prompt_text is not None else len(request.raw_body)
    return (ratios or _PRIOR).tokens(request.target_model or body.model, chars)


def estimate_tokens(request: InferenceRequest, ratios: TokenRatios | None = None) -> int:
    """Prompt + expected output tokens of a request."""
    prompt = estimate_prompt_tokens(request, ratios)
    body = request.body
    output = body.max_output_tokens if body.max_output_tokens is not None else prompt * 3 // 2
    return prompt + min(output, MAX_OUTPUT_ESTIMATE)


class Director:
    def __init__(self, pool: EndpointPool, config: PickerConfig, disable_subset_filter: bool = False,
                 explain: bool = False, metrics: EppMetrics | None = None,
                 objectives: Objectives | None = None, hooks: RequestHooks | None = None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.hooks = hooks  # decision log, explanations, tracing (epp.observability.hooks)
        self.recorder: TraceRecorder | None = None  # --record-trace (epp.trace)
        self.objectives = objectives or Objectives()
        self.disable_subset_filter = disable_subset_filter
        self.explain = explain
        self.admission = Admission(self, metrics)  # saturation, priority, flow control (epp.admission)
        self.models = ModelPaths(pool)  # the /<model>/ path prefixes
        self.waker = Waker(self, metrics=metrics)  # wake-on-request, accelerator budget, idle sleep
        self.set_config(config)

    def set_config(self, config: PickerConfig) -> None:
        """Swap the scheduling configuration (live reload); requests in flight keep their hooks."""
        self.config = config
        self.admission.configure(getattr(config, "admission", None))
        self.observers: list[RequestObserver] = config.plugins_of(RequestObserver)
        self.body_observers = [o for o in self.observers if o.needs_response_body or o.uses_response_body]
        self._needs_bodies = [o.name for o in self.observers if o.needs_response_body]
        self.preparers = [p for p in config.plugins_of(RequestPreparer) if p.prepares]
        self._warned_no_bodies = False
        if self._needs_bodies:
            log.info("plugins %s read response bodies: configure Envoy with response_body_mode "
                     "FULL_DUPLEX_STREAMED", self._needs_bodies)

    def note_response_body_mode(self, sends_bodies: bool) -> None:
        """Envoy told a stream whether it will send response bodies (its protocol_config)."""
        if not sends_bodies and self._needs_bodies and not self._warned_no_bodies:
            self._warned_no_bodies = True
            log.warning("Envoy sends no response bodies (response_body_mode NONE) but plugins %s need them; "
                        "they will only see response headers and the end of each request", self._needs_bodies)

    def model_path(self, path: str) -> ModelPath | None:
        """The model a ``/<model>/...`` path prefix names, or None."""
        return self.models.resolve(path)

    def model_status(self, route: ModelPath) -> dict[str, Any]:
        """The answer to ``GET /<model>/status`` (``Waker.status``)."""
        return self.waker.status(route.name, route.model)

    def priority(self, objective: str | None) -> int:
        """The priority of a request's objective (``Objectives.priority``)."""
        return self.objectives.priority(objective)

    def target_model(self, model: str, header_target: str | None) -> str:
        """The model to send upstream: a rewrite rule for the incoming model wins, then the rewrite header."""
        if model:
            found = self.objectives.rewrite(model)
            if found:
                return found[0]
        return header_target or model

    def candidates(self, subset: Sequence[str] | None, awake_only: bool = True,
                   model: str | None = None) -> list[Endpoint]:
        """The pool (or the proxy's subset of it; or the endpoints serving ``model``, the one a path prefix
        selected), minus endpoints that stopped answering; all of them when every one has, since a guess beats a
        certain 503 while metrics are what is broken. Minus sleeping and draining endpoints (``awake_only``): the
        waker woke one first when all of them slept."""
        endpoints = self.pool.endpoints
        if model is not None:
            endpoints = tuple(self.models.endpoints(model))
            if not endpoints:
                raise EppError(503, "rejected-no-endpoints", f"no endpoint serves the model {model!r} (yet)")
        found: Sequence[Endpoint]
        if subset is not None and not self.disable_subset_filter:
            found = filter_subset(endpoints, subset)
            if not found:
                raise EppError(503, "rejected-no-endpoints",
                               "failed to find endpoint candidates for serving the request: "
                               "no endpoint matches the subset hint")
        elif not endpoints:
            raise EppError(503, "rejected-no-endpoints",
                           "failed to find endpoint candidates for serving the request: the pool is empty")
        else:
            found = endpoints
        answering = [e for e in found if not e.metrics.unreachable] or list(found)
        if awake_only:
            draining = self.waker.draining
            awake = [e for e in answering if not e.asleep and e not in draining]
            if not awake:
                raise EppError(503, "wake-failed", "every endpoint that could serve the request is asleep")
            return awake
        return answering

    async def route(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision:
        """Admission first (it may hold the request, or refuse it), then the pick. No await between the two: a
        request flow control releases is counted in flight before the next saturation check."""
        if self.recorder is not None:
            self.recorder.record(request)
        if self.admission.applies(request):
            # may hold the request while a sleeping endpoint wakes
            await self.waker.ensure_awake(subset, request.path_model)
            if self.preparers:
                await self.prepare(request, subset)
            await self.admission.admit(request, subset)
        elif self.preparers and request.method.upper() == "POST":
            await self.prepare(request, subset)
        return self.schedule(request, subset)

    async def prepare(self, request: InferenceRequest, subset: Sequence[str] | None) -> None:
        """The preparing plugins' awaits (each bounded by the plugin); a failure leaves the request unprepared
        (those plugins fall back), and candidate errors are left for scheduling to report."""
        try:
            candidates = self.candidates(subset, model=request.path_model)
        except EppError:
            return
        for p in self.preparers:
            try:
                await p.prepare_request(request, candidates)
            except Exception:
                log.exception("plugin %s failed in prepare_request", p.name)

    def schedule(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision:
        # a request without a body (GET /v1/models) may go to a sleeping engine: it answers those
        candidates = self.candidates(subset, awake_only=self.admission.applies(request), model=request.path_model)
        explain = self.explain or (self.hooks is not None and self.hooks.wants_explain(request))
        config = self.config
        t0 = time.perf_counter()
        result = config.scheduler.schedule(request, candidates, explain=explain)
        decision = Decision(result.endpoints, result, estimate_tokens(request, self.pool.tokens))
        primary = decision.primary
        elapsed = time.perf_counter() - t0
        if self.metrics:
            self.metrics.routed(request, primary, elapsed)
            if result.disagg is not None:
                self.metrics.disaggregated(result.disagg["decision"], result.prefill)
        if self.hooks is not None:
            self.hooks.routed(request, decision, elapsed, config, len(candidates))
        primary.inflight_requests += 1
        primary.inflight_tokens += decision.tokens
        self.waker.touch(primary)
        self.admission.started(request)
        if result.prefill is not None:  # P/D: the prefill pod is busy until the decode pod's answer starts
            decision.prefill_tokens = max(1, estimate_prompt_tokens(request, self.pool.tokens))
            result.prefill.inflight_requests += 1
            result.prefill.inflight_tokens += decision.prefill_tokens
        for obs in self.observers:
            try:
                obs.pre_request(request, result)
            except Exception:
                log.exception("plugin %s failed in pre_request", obs.name)
        return decision

    def rejected(self, request: InferenceRequest | None, err: EppError) -> None:
        """EPP answered the request itself (bad input, no endpoint, ...)."""
        if self.metrics:
            self.metrics.rejected(request, err)
        if self.hooks is not None:
            self.hooks.rejected(request, err)

    @staticmethod
    def _prefill_done(decision: Decision) -> None:
        prefill = decision.result.prefill
        if prefill is not None and decision.prefill_tokens:
            prefill.inflight_requests = max(0, prefill.inflight_requests - 1)
            prefill.inflight_tokens = max(0, prefill.inflight_tokens - decision.prefill_tokens)
            decision.prefill_tokens = 0

    def response_headers(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        self._prefill_done(decision)  # the decode pod answers once the remote prefill and the KV pull are done
        for obs in self.observers:
            try:
                obs.on_response_headers(request, decision.primary, response)
            except Exception:
                log.exception("plugin %s failed in on_response_headers", obs.name)

    def response_body(self, request: InferenceRequest, decision: Decision, chunk: bytes, eos: bool) -> None:
        for obs in self.body_observers:
            try:
                obs.on_response_body(request, decision.primary, chunk, eos)
            except Exception:
                log.exception("plugin %s failed in on_response_body", obs.name)

    def complete(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        """Called exactly once per routed request, when the response ended or the stream died."""
        primary = decision.primary
        primary.inflight_requests = max(0, primary.inflight_requests - 1)
        primary.inflight_tokens = max(0, primary.inflight_tokens - decision.tokens)
        self.waker.touch(primary)
        self._prefill_done(decision)
        self.admission.completed(request)
        u = response.usage
        text = request.body.prompt_text
        if u is not None and u.prompt_tokens and text and request.body.prompt_token_ids is None \
                and 200 <= response.status < 300:
            self.pool.tokens.observe(request.target_model or request.model, len(text), u.prompt_tokens)
        if self.metrics:
            u = response.usage
            self.metrics.completed(request, response.status, monotonic() - request.received_at, response.bytes,
                                   u and u.prompt_tokens, u and u.completion_tokens, u and u.cached_tokens)
        if self.hooks is not None:
            self.hooks.completed(request, decision, response)
        for obs in self.observers:
            try:
                obs.on_response_complete(request, primary, response)
            except Exception:
                log.exception("plugin %s failed in on_response_complete", obs.name)
