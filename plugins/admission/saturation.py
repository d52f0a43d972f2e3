"""Saturation detectors (llm-d / GIE names and parameters): how full the candidate endpoints are.

* ``utilization-detector`` (the default): per endpoint ``max(waiting / queueDepthThreshold,
  kv_cache_usage / kvCacheUtilThreshold)``; an endpoint whose metrics are older than
  ``metricsStalenessThreshold`` (or never scraped) counts as fully saturated (fail closed); the pool's
  saturation is the mean over the candidates. ``headroom`` raises both thresholds by that fraction. Scraped
  values are up to a scrape interval old, so the waiting count and the KV usage include what EPP routed to (or
  saw end at) the endpoint since its last scrape (``Endpoint.waiting_now``, ``kv_usage_now``): a dispatch loop
  reading scraped values alone would release every queued request at once between two scrapes.
* ``concurrency-detector``: EPP's own in-flight counts against a per-endpoint limit, no scraping involved:
  ``concurrencyMode: requests`` (the default) sums in-flight requests against ``maxConcurrency`` (100) per
  endpoint; ``tokens`` sums in-flight tokens (prompt + expected output) against ``maxTokenConcurrency``
  (1,000,000). Pool saturation = total in flight / total capacity. llm-d's advice: ``maxConcurrency`` about
  110% of the engine's batch size (``--max-num-seqs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.admission.interfaces import SaturationDetector
from epp.clock import monotonic
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.registry import register_plugin
from epp_plugins.scorers.common import check_duration, check_float, check_int, check_str

# GIE's utilization detector defaults, also utilization-filter's (the detector as a filter). Saturation wants metrics
# fresher than the scorers' --metrics-staleness-threshold: a 2 s old queue says little about room now.
QUEUE_DEPTH_THRESHOLD = 5
KV_CACHE_UTIL_THRESHOLD = 0.8
SATURATION_STALENESS = "200ms"


@register_plugin("utilization-detector")
class UtilizationDetector(SaturationDetector):
    def __init__(self, queue_depth_threshold: int = QUEUE_DEPTH_THRESHOLD,
                 kv_cache_util_threshold: float = KV_CACHE_UTIL_THRESHOLD,
                 metrics_staleness_threshold: Any = SATURATION_STALENESS, headroom: float = 0.0) -> None:
        self.queue = check_int(queue_depth_threshold, "queueDepthThreshold", 1)
        self.kv = check_float(kv_cache_util_threshold, "kvCacheUtilThreshold", 0.0, 1.0, exclusive_minimum=True)
        self.staleness = check_duration(metrics_staleness_threshold, "metricsStalenessThreshold")
        self.headroom = check_float(headroom, "headroom", 0.0)

    def endpoint_saturation(self, e: Endpoint, now: float) -> float:
        if self.staleness > 0 and e.metrics.age(now) > self.staleness:
            return 1.0
        scale = 1.0 + self.headroom
        return max(e.waiting_now() / (self.queue * scale), e.kv_usage_now() / (self.kv * scale))

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        now = monotonic()
        return sum(self.endpoint_saturation(e, now) for e in endpoints) / len(endpoints)


@register_plugin("concurrency-detector")
class ConcurrencyDetector(SaturationDetector):
    def __init__(self, concurrency_mode: str = "requests", max_concurrency: int = 100,
                 max_token_concurrency: int = 1_000_000, headroom: float = 0.0) -> None:
        self.mode = check_str(concurrency_mode, "concurrencyMode", ("requests", "tokens"))
        self.max_requests = check_int(max_concurrency, "maxConcurrency", 1)
        self.max_tokens = check_int(max_token_concurrency, "maxTokenConcurrency", 1)
        self.headroom = check_float(headroom, "headroom", 0.0)

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        if self.mode == "tokens":
            return sum(e.inflight_tokens for e in endpoints) / (self.max_tokens * len(endpoints))
        return sum(e.inflight_requests for e in endpoints) / (self.max_requests * len(endpoints))
