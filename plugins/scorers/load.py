"""Scorers that spread load.

From the model servers' scraped metrics (GIE / llm-d formulas): ``queue-scorer``,
``running-requests-size-scorer``, ``kv-cache-utilization-scorer``, ``load-aware-scorer``,
``lora-affinity-scorer``. Each takes ``metricsStalenessThreshold`` (default: ``--metrics-staleness-threshold``,
2s as GIE's; 0 trusts any age): an endpoint whose metrics are older, or were never
scraped, is scored as the worst possible (0) rather than trusted, and the min-max scorers normalise over
the fresh endpoints only.

From EPP's first-hand in-flight counts (``Endpoint.inflight_requests`` / ``inflight_tokens``, raised on
pick and lowered at completion; never stale): ``active-request-scorer``, ``token-load-scorer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.plugin import (
    Endpoint,
    FollowsStalenessFlag,
    InferenceRequest,
    Scorer,
    check_duration,
    check_float,
    check_int,
    check_str,
    fresh_mask,
    min_max_inverse,
    register_plugin,
)
from epp_plugins.scorers.prefix import PrefixSource, resolve_prefix_source

__all__ = ["min_max_inverse"]


class _MetricsScorer(FollowsStalenessFlag, Scorer):
    def __init__(self, metrics_staleness_threshold: Any = None) -> None:
        self.set_staleness(metrics_staleness_threshold)


def _fresh_min_max(endpoints: Sequence[Endpoint], values: Sequence[float], staleness: float) -> list[float]:
    fresh = fresh_mask(endpoints, staleness)
    if all(fresh):
        return min_max_inverse(values)
    kept = [v for v, f in zip(values, fresh, strict=True) if f]
    scored = iter(min_max_inverse(kept))
    return [next(scored) if f else 0.0 for f in fresh]


@register_plugin("queue-scorer")
class QueueScorer(_MetricsScorer):
    """Fewer waiting requests -> higher: ``(max - q) / (max - min)`` over the fresh candidates, all equal -> 1."""

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        return _fresh_min_max(endpoints, [e.metrics.waiting_requests for e in endpoints], self.staleness)


@register_plugin("running-requests-size-scorer")
class RunningRequestsSizeScorer(_MetricsScorer):
    """Fewer running requests -> higher (min-max over the fresh candidates, all equal -> 1)."""

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        return _fresh_min_max(endpoints, [e.metrics.running_requests for e in endpoints], self.staleness)


@register_plugin("kv-cache-utilization-scorer")
class KVCacheUtilizationScorer(_MetricsScorer):
    """``1 - kv_cache_usage`` (usage 0..1), the usage brought up to date with what EPP routed there since the
    scrape (``Endpoint.kv_usage_now``) when the endpoint reports its KV capacity; GIE reads the scraped value,
    so every pick made within one scrape interval goes to the same endpoint."""

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        fresh = fresh_mask(endpoints, self.staleness)
        return [1.0 - e.kv_usage_now() if f else 0.0
                for e, f in zip(endpoints, fresh, strict=True)]


@register_plugin("load-aware-scorer")
class LoadAwareScorer(_MetricsScorer):
    """llm-d: empty queue -> 0.5; else ``0.5 * (1 - min(q, threshold) / threshold)``. Its maximum is 0.5, so its
    effective weight is half the configured one."""

    def __init__(self, threshold: int = 128, metrics_staleness_threshold: Any = None) -> None:
        super().__init__(metrics_staleness_threshold)
        self.threshold = check_int(threshold, "threshold", 1)

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        t = self.threshold
        fresh = fresh_mask(endpoints, self.staleness)
        out = []
        for e, f in zip(endpoints, fresh, strict=True):
            q = e.metrics.waiting_requests
            out.append(0.0 if not f else 0.5 if q <= 0 else 0.5 * (1.0 - min(q, t) / t))
        return out


@register_plugin("lora-affinity-scorer")
class LoraAffinityScorer(_MetricsScorer):
    """GIE: the target model (adapter) active on the endpoint -> 1.0; else room to load one more adapter
    (active + waiting < max) -> 0.8; else the adapter already waiting to load -> 0.6; else 0."""

    category = "affinity"

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        target = request.target_model or request.model
        fresh = fresh_mask(endpoints, self.staleness)
        out = []
        for e, f in zip(endpoints, fresh, strict=True):
            m = e.metrics
            if not f:
                out.append(0.0)
            elif target in m.active_models:
                out.append(1.0)
            elif len(m.active_models) + len(m.waiting_models) < m.max_active_models:
                out.append(0.8)
            elif target in m.waiting_models:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


@register_plugin("active-request-scorer")
class ActiveRequestScorer(Scorer):
    """llm-d: EPP's in-flight requests ``c`` per endpoint, ``max`` over the candidates: ``c <= idleThreshold``
    -> 1; else ``(max - c) / max * maxBusyScore``. ``requestTimeout`` is accepted for old configs and
    ignored (EPP counts every request out exactly once)."""

    def __init__(self, idle_threshold: int = 0, max_busy_score: float = 1.0, request_timeout: Any = None) -> None:
        self.idle = check_int(idle_threshold, "idleThreshold", 0)
        self.max_busy = check_float(max_busy_score, "maxBusyScore", 0.0, 1.0)
        if request_timeout is not None:
            check_duration(request_timeout, "requestTimeout")

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        counts = [e.inflight_requests for e in endpoints]
        top = max(counts, default=0)
        idle, busy = self.idle, self.max_busy
        return [1.0 if c <= idle or top <= 0 else (top - c) / top * busy for c in counts]


@register_plugin("token-load-scorer")
class TokenLoadScorer(Scorer):
    """llm-d: ``1 - min(1, load / queueThresholdTokens)`` where load is the endpoint's in-flight tokens
    (EPP's estimate: prompt + expected output of each routed request) plus, when a prefix-cache scorer or
    producer is configured, this request's prompt tokens the endpoint does not hold in its prefix cache --
    so an endpoint that already holds the prompt is charged less for taking it."""

    def __init__(self, queue_threshold_tokens: int = 4194304, prefix_plugin_name: str | None = None) -> None:
        self.threshold = check_int(queue_threshold_tokens, "queueThresholdTokens", 1)
        self.prefix_name = check_str(prefix_plugin_name, "prefixPluginName") if prefix_plugin_name else None
        self._source: PrefixSource | None = None

    def start(self) -> None:
        self._source = resolve_prefix_source(self, self.prefix_name, required=bool(self.prefix_name))

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        t = self.threshold
        loads = [e.inflight_tokens for e in endpoints]
        if self._source is not None:
            prod = self._source.prefix_producer()
            st = prod.state(request, endpoints)
            matches = prod.match_all(st, endpoints)
            prompt = st.prompt_tokens
            loads = [load + max(0, prompt - st.matched_tokens(m)) for load, m in zip(loads, matches, strict=True)]
        return [1.0 - min(1.0, max(0, load) / t) for load in loads]
