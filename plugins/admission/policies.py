"""Flow-control policies (llm-d / GIE names): fairness between the flows of a band, order within a flow, usage
limits.

Fairness:

* ``global-strict-fairness-policy`` (the default): one order across the whole band, whatever the flow (the
  band's ordering policy decides; with FCFS, first come first served across tenants).
* ``round-robin-fairness-policy``: the flows (fairness ids, ``x-gateway-inference-fairness-id``) of a band
  take turns, one dispatch each, so a flow that sends a burst cannot starve one that sends little.

Ordering within a flow:

* ``fcfs-ordering-policy`` (the default): arrival order.
* ``edf-ordering-policy``: earliest deadline first, the deadline being when the request's queue-wait budget
  (its TTL) runs out; requests without a TTL last.
* ``slo-deadline-ordering-policy``: earliest SLO deadline first: when the request arrived plus its
  ``x-llm-d-slo-ttft-ms`` header; requests without a valid header after those with one, FCFS among them.

Usage limits: ``static-usage-limit-policy`` (the default): every band dispatches while saturation < 1.0;
``priority-holdback-policy``: lower priorities stop dispatching at lower saturations (below);
``priority-reserve-policy`` (EPP's): a band leaves free the capacity higher bands recently needed (below).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from epp.admission.demand import Demand
from epp.admission.interfaces import FairnessPolicy, OrderingPolicy, UsageLimitPolicy
from epp.admission.queue import BandQueue, QueueItem
from epp.scheduling.registry import register_plugin
from epp_plugins.scorers.common import check_duration, check_float, check_str

SLO_TTFT_HEADER = "x-llm-d-slo-ttft-ms"
_INF = math.inf


@register_plugin("global-strict-fairness-policy")
class GlobalStrictFairness(FairnessPolicy):
    def select(self, band: BandQueue) -> QueueItem | None:
        return band.head()


@register_plugin("round-robin-fairness-policy")
class RoundRobinFairness(FairnessPolicy):
    def select(self, band: BandQueue) -> QueueItem | None:
        for fairness_id in band.rotation:  # the flow whose turn it is is first
            head = band.flows[fairness_id].head()
            if head is not None:
                return head
        return None

    def dispatched(self, band: BandQueue, item: QueueItem) -> None:
        rotation = band.rotation
        if rotation and rotation[0] == item.fairness_id:
            rotation.rotate(-1)  # its turn is over
        elif item.fairness_id in band.flows and item.fairness_id in rotation:
            rotation.remove(item.fairness_id)
            rotation.append(item.fairness_id)


@register_plugin("fcfs-ordering-policy")
class FcfsOrdering(OrderingPolicy):
    def key(self, item: QueueItem) -> tuple[float, ...]:
        return (item.enqueued_at,)


@register_plugin("edf-ordering-policy")
class EdfOrdering(OrderingPolicy):
    def key(self, item: QueueItem) -> tuple[float, ...]:
        return (item.enqueued_at + item.ttl if item.ttl > 0 else _INF, item.enqueued_at)


def slo_ttft_seconds(headers: dict[str, str]) -> float | None:
    text = headers.get(SLO_TTFT_HEADER, "").strip()
    try:
        ms = float(text)
    except ValueError:
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms > 0 else None


@register_plugin("slo-deadline-ordering-policy")
class SloDeadlineOrdering(OrderingPolicy):
    def key(self, item: QueueItem) -> tuple[float, ...]:
        slo = slo_ttft_seconds(item.request.headers)
        received = item.request.received_at or item.enqueued_at
        return (received + slo if slo is not None else _INF, item.enqueued_at)


@register_plugin("static-usage-limit-policy")
class StaticUsageLimit(UsageLimitPolicy):
    def ceiling(self, priority: int, priorities: Sequence[int]) -> float:
        return 1.0


@register_plugin("priority-holdback-policy")
class PriorityHoldback(UsageLimitPolicy):
    """llm-d's ``priority-holdback-policy``: the highest active priority dispatches up to ``maxCeiling``, the
    lowest up to ``minCeiling`` (required), the others in between (``shape: linear``), by rank (``domain:
    rank``, equal steps) or by value (``domain: value``, proportional to the priority). Lower priorities stop
    first as the pool fills, keeping headroom for higher ones; nothing running is interrupted."""

    def __init__(self, min_ceiling: float | None = None, max_ceiling: float = 1.0, shape: str = "linear",
                 domain: str = "rank") -> None:
        if min_ceiling is None:
            raise ValueError("minCeiling is required (the ceiling of the lowest priority, in [0, 1))")
        self.min = check_float(min_ceiling, "minCeiling", 0.0, 1.0)
        if self.min >= 1.0:
            raise ValueError("minCeiling must be < 1")
        self.max = check_float(max_ceiling, "maxCeiling", 0.0, 1.0, exclusive_minimum=True)
        if self.min > self.max:
            raise ValueError("minCeiling must not exceed maxCeiling")
        self.shape = check_str(shape, "shape", ("linear",))
        self.domain = check_str(domain, "domain", ("rank", "value"))

    def ceiling(self, priority: int, priorities: Sequence[int]) -> float:
        levels = sorted(set(priorities) | {priority}, reverse=True)
        if len(levels) == 1:
            return self.max
        if self.domain == "value":
            lo, hi = levels[-1], levels[0]
            return self.min + (priority - lo) / (hi - lo) * (self.max - self.min)
        return self.max - levels.index(priority) * (self.max - self.min) / (len(levels) - 1)


@register_plugin("priority-reserve-policy")
class PriorityReserve(UsageLimitPolicy):
    """A band dispatches only while the pool, after it, would still have room for the most requests each higher
    band had in flight at once over the last ``window`` (default 10s), less those it has in flight now. A higher
    band's arrivals then find a free slot instead of waiting for one to end (a whole decode), so its TTFT holds
    under overload; the room follows the higher bands' own demand rather than a fixed fraction. Every band
    dispatches up to saturation 1.0 (strict priority still orders what waits)."""

    def __init__(self, window: object = "10s") -> None:
        self.window = check_duration(window, "window")
        if self.window <= 0:
            raise ValueError("window must be positive")

    def ceiling(self, priority: int, priorities: Sequence[int]) -> float:
        return 1.0

    def reserve(self, priority: int, demand: Demand) -> float:
        return float(sum(max(0, demand.peak(p, self.window) - demand.inflight(p))
                         for p in demand.priorities() if p > priority))
