"""Scorers that spread load, from the model servers' scraped metrics."""

from __future__ import annotations

from collections.abc import Sequence

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.plugins import CycleState, Scorer
from epp.scheduling.registry import register_plugin


def min_max_inverse(values: Sequence[float]) -> list[float]:
    """1 for the lowest value, 0 for the highest, linear between; all equal -> 1 for all."""
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


@register_plugin("queue-scorer")
class QueueScorer(Scorer):
    """Fewer waiting requests on the model server -> higher score (min-max over the candidates)."""

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        return min_max_inverse([e.metrics.waiting_requests for e in endpoints])


@register_plugin("running-requests-size-scorer")
class RunningRequestsSizeScorer(Scorer):
    """Fewer running requests -> higher score (min-max over the candidates)."""

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        return min_max_inverse([e.metrics.running_requests for e in endpoints])


@register_plugin("kv-cache-utilization-scorer")
class KVCacheUtilizationScorer(Scorer):
    """Score = 1 - KV-cache usage (0..1)."""

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        return [1.0 - e.metrics.kv_cache_usage for e in endpoints]
