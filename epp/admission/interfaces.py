"""The admission plugin roles (llm-d's flow-control framework interfaces), implemented by ``plugins/admission``.

* ``SaturationDetector``: how full the candidate endpoints are, one number (>= 1.0: saturated). Legacy admission
  sheds sheddable requests at saturation; flow control dispatches queued requests only below it.
* ``OrderingPolicy``: the order of requests *within one flow* (a sort key computed when a request is queued).
* ``FairnessPolicy``: which flow of a priority band is served next.
* ``UsageLimitPolicy``: the saturation ceiling below which a band may dispatch, and the room it must leave free
  for higher bands.

Like every plugin, each is registered under a kebab-case type name and configured in ``plugins:``; the
``flowControl`` section refers to them by name (``fairnessPolicyRef``, ``orderingPolicyRef``,
``usageLimitPolicyPluginRef``, ``saturationDetector.pluginRef``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from epp.datalayer.endpoint import Endpoint
from epp.scheduling.plugins import Plugin

if TYPE_CHECKING:
    from epp.admission.demand import Demand
    from epp.admission.queue import BandQueue, QueueItem


class SaturationDetector(Plugin):
    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        """0 = idle, >= 1.0 = saturated. No endpoints: 1.0."""
        raise NotImplementedError


class OrderingPolicy(Plugin):
    def key(self, item: QueueItem) -> tuple[float, ...]:
        """Sort key of a queued request within its flow: smaller goes first (ties: arrival order)."""
        raise NotImplementedError


class FairnessPolicy(Plugin):
    def select(self, band: BandQueue) -> QueueItem | None:
        """The request of ``band`` to dispatch next (None when the band is empty). Must not remove it."""
        raise NotImplementedError

    def dispatched(self, band: BandQueue, item: QueueItem) -> None:
        """``item``, chosen by ``select``, was dispatched."""


class UsageLimitPolicy(Plugin):
    def ceiling(self, priority: int, priorities: Sequence[int]) -> float:
        """Band ``priority`` dispatches while the pool's saturation is below this. ``priorities``: the priority
        levels with recent traffic, highest first (``priority`` among them)."""
        return 1.0

    def reserve(self, priority: int, demand: Demand) -> float:
        """Requests' worth of capacity band ``priority`` must leave free for higher bands (added to the
        saturation before comparing it with the ceiling)."""
        return 0.0
