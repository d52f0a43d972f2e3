"""Flow-control metrics, with GIE's names and labels:

* ``inference_extension_flow_control_queue_size`` / ``..._queue_bytes`` (gauges; ``fairness_id``, ``priority``,
  ``inference_pool``): requests held now, and their body bytes. The signal to autoscale on (scale from zero:
  requests wait here while the pool has no endpoint).
* ``inference_extension_flow_control_request_queue_duration_seconds`` (histogram; ``fairness_id``,
  ``priority``, ``outcome``, ``inference_pool``, ``model_name``, ``target_model_name``): time from admission to
  the outcome, for every request flow control handled; its ``_count`` by ``outcome`` counts drops.
* ``inference_extension_flow_control_pool_saturation`` (gauge; ``inference_pool``): the saturation detector's
  value for the whole pool.
* ``epp_flow_control_requests_total`` (counter; ``fairness_id``, ``priority``, ``outcome``): outcomes, without
  the histogram's buckets.

Outcomes are llm-d's: ``Dispatched``, ``RejectedCapacity``, ``RejectedNoEndpoints``, ``EvictedTTL``,
``EvictedNoEndpoints``, ``EvictedContextCancelled`` (the client went away while queued), plus
``EvictedDisplaced`` (a queued request of a lower priority removed to make room for a higher one).

Fairness ids come from a client header: the first ``MAX_FAIRNESS_LABELS`` seen are labels, later ones are
counted under ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.api.types import InferenceRequest
from epp.observability.metrics import FastHistogramFamily

if TYPE_CHECKING:
    from epp.admission.controller import Admission

MAX_FAIRNESS_LABELS = 64
_QUEUE_SECONDS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("Dispatched", "RejectedCapacity", "RejectedNoEndpoints", "EvictedTTL", "EvictedNoEndpoints",
            "EvictedContextCancelled", "EvictedDisplaced")


class FlowControlMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, admission: Admission, pool_name: Callable[[], str],
                 model_label: Callable[[str], str] = lambda name: name) -> None:
        self.admission = admission
        self.pool_name = pool_name
        self.model_label = model_label
        self._fairness: set[str] = set()
        self.queue_duration = FastHistogramFamily(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time requests spent in flow control, from admission to their outcome.",
            ["fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"],
            _QUEUE_SECONDS)
        registry.register(self.queue_duration)
        self.outcomes = Counter("epp_flow_control_requests", "Requests flow control handled, by outcome.",
                                ["fairness_id", "priority", "outcome"], registry=registry)
        registry.register(self)

    def fairness_label(self, fairness_id: str) -> str:
        if fairness_id in self._fairness:
            return fairness_id
        if len(self._fairness) < MAX_FAIRNESS_LABELS:
            self._fairness.add(fairness_id)
            return fairness_id
        return "other"

    def outcome(self, request: InferenceRequest, outcome: str, seconds: float) -> None:
        fairness = self.fairness_label(request.fairness_id)
        priority = str(request.priority)
        self.queue_duration.labels(fairness, priority, outcome, self.pool_name(), self.model_label(request.model),
                                   self.model_label(request.target_model)).observe(seconds)
        self.outcomes.labels(fairness, priority, outcome).inc()

    def collect(self) -> Iterator[Any]:
        pool = self.pool_name()
        size = GaugeMetricFamily("inference_extension_flow_control_queue_size", "Requests held by flow control now.",
                                 labels=["fairness_id", "priority", "inference_pool"])
        nbytes = GaugeMetricFamily("inference_extension_flow_control_queue_bytes",
                                   "Body bytes of the requests held by flow control now.",
                                   labels=["fairness_id", "priority", "inference_pool"])
        totals: dict[tuple[str, str], list[int]] = {}
        for priority, band in list(self.admission.bands.items()):  # read off the event loop: copy first
            for fairness_id, flow in list(band.flows.items()):
                key = (fairness_id if fairness_id in self._fairness else "other", str(priority))
                acc = totals.setdefault(key, [0, 0])
                acc[0] += flow.count
                acc[1] += flow.bytes
        for (fairness, priority), (count, held) in totals.items():
            size.add_metric([fairness, priority, pool], count)
            nbytes.add_metric([fairness, priority, pool], held)
        if not totals:  # an autoscaler's query needs a series even when nothing waits
            size.add_metric(["", "", pool], 0)
            nbytes.add_metric(["", "", pool], 0)
        yield size
        yield nbytes
        saturation = GaugeMetricFamily("inference_extension_flow_control_pool_saturation",
                                       "The saturation detector's value for the pool (>= 1: saturated).",
                                       labels=["inference_pool"])
        saturation.add_metric([pool], self.admission.pool_saturation())
        yield saturation
