"""``utilization-filter``: drop saturated endpoints and endpoints whose metrics cannot be trusted."""

from __future__ import annotations

from typing import Any

from epp.plugin import (
    Endpoint,
    Filter,
    InferenceRequest,
    check_duration,
    check_float,
    check_int,
    fresh_mask,
    register_plugin,
)
from epp_plugins.admission.saturation import KV_CACHE_UTIL_THRESHOLD, QUEUE_DEPTH_THRESHOLD, SATURATION_STALENESS


@register_plugin("utilization-filter")
class UtilizationFilter(Filter):
    """GIE's utilization detector as a filter: keep an endpoint when its metrics are fresh (younger than
    ``metricsStalenessThreshold``, default 200ms; 0 = any age) and ``waiting < queueDepthThreshold * (1 +
    headroom)`` and ``kv_cache_usage < kvCacheUtilThreshold * (1 + headroom)`` (defaults 5, 0.8, 0). When
    that would remove every endpoint, all are returned: the filter sheds load only while somewhere
    better exists."""

    def __init__(self, queue_depth_threshold: int = QUEUE_DEPTH_THRESHOLD,
                 kv_cache_util_threshold: float = KV_CACHE_UTIL_THRESHOLD, headroom: float = 0.0,
                 metrics_staleness_threshold: Any = SATURATION_STALENESS) -> None:
        self.queue = check_int(queue_depth_threshold, "queueDepthThreshold", 1)
        self.kv = check_float(kv_cache_util_threshold, "kvCacheUtilThreshold", 0.0, 1.0, exclusive_minimum=True)
        self.headroom = check_float(headroom, "headroom", 0.0)
        self.staleness = check_duration(metrics_staleness_threshold, "metricsStalenessThreshold")

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        q_limit = self.queue * (1.0 + self.headroom)
        kv_limit = self.kv * (1.0 + self.headroom)
        fresh = fresh_mask(endpoints, self.staleness)
        kept = [e for e, f in zip(endpoints, fresh, strict=True)
                if f and e.metrics.waiting_requests < q_limit and e.metrics.kv_cache_usage < kv_limit]
        return kept or endpoints
