"""The queues flow control holds requests in: one ``BandQueue`` per priority, one ``FlowQueue`` per fairness id
inside it, each a heap ordered by the band's ordering policy.

Removal (dispatch, TTL, cancellation, displacement) marks an item and adjusts the counts at once; the heaps drop
marked entries lazily when they reach the top. Pure data structures, no I/O, no clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.api.types import InferenceRequest


@dataclass(eq=False, slots=True)
class QueueItem:
    request: InferenceRequest
    subset: Sequence[str] | None
    size: int  # request body bytes
    enqueued_at: float  # time.monotonic()
    seq: int  # arrival order, the tie-breaker of every ordering
    ttl: float  # queue-wait budget while the pool has endpoints, seconds (0: none)
    future: asyncio.Future[Any]
    key: tuple[float, ...] = ()
    queued: bool = True

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def fairness_id(self) -> str:
        return self.request.fairness_id


def _top(heap: list[tuple[tuple[float, ...], int, QueueItem]]) -> QueueItem | None:
    while heap:
        item = heap[0][2]
        if item.queued:
            return item
        heapq.heappop(heap)
    return None


def _compact(heap: list[tuple[tuple[float, ...], int, QueueItem]]) -> list[tuple[tuple[float, ...], int, QueueItem]]:
    live = [entry for entry in heap if entry[2].queued]
    heapq.heapify(live)
    return live


@dataclass(eq=False, slots=True)
class FlowQueue:
    fairness_id: str
    heap: list[tuple[tuple[float, ...], int, QueueItem]] = field(default_factory=list)
    count: int = 0
    bytes: int = 0

    def head(self) -> QueueItem | None:
        return _top(self.heap)


class BandQueue:
    """The requests of one priority: per flow, and in one band-wide order (for global-strict fairness)."""

    def __init__(self, priority: int) -> None:
        self.priority = priority
        self.flows: dict[str, FlowQueue] = {}
        self.heap: list[tuple[tuple[float, ...], int, QueueItem]] = []
        self.rotation: deque[str] = deque()  # flows with requests, in round-robin order
        self.count = 0
        self.bytes = 0

    def push(self, item: QueueItem) -> None:
        flow = self.flows.get(item.fairness_id)
        if flow is None:
            flow = self.flows[item.fairness_id] = FlowQueue(item.fairness_id)
            self.rotation.append(item.fairness_id)
        entry = (item.key, item.seq, item)
        heapq.heappush(flow.heap, entry)
        heapq.heappush(self.heap, entry)
        flow.count += 1
        flow.bytes += item.size
        self.count += 1
        self.bytes += item.size

    def remove(self, item: QueueItem) -> None:
        """Take ``item`` out (it stays in the heaps, marked, until it reaches a top)."""
        if not item.queued:
            return
        item.queued = False
        self.count -= 1
        self.bytes -= item.size
        flow = self.flows[item.fairness_id]
        flow.count -= 1
        flow.bytes -= item.size
        if flow.count == 0:  # an idle flow leaves at once: fairness ids are the client's, unbounded
            del self.flows[item.fairness_id]
            with contextlib.suppress(ValueError):
                self.rotation.remove(item.fairness_id)
        if self.count == 0:
            self.heap.clear()
        elif len(self.heap) > 2 * self.count + 64:  # marked entries never reach the top in some orders
            self.heap = _compact(self.heap)
        if flow.count and len(flow.heap) > 2 * flow.count + 64:
            flow.heap = _compact(flow.heap)

    def head(self) -> QueueItem | None:
        """The first request in band-wide order."""
        return _top(self.heap)

    def items(self) -> Iterator[QueueItem]:
        return (entry[2] for entry in list(self.heap) if entry[2].queued)

    def reorder(self, key: Any) -> None:
        """The ordering policy changed (config reload): recompute every key and rebuild the heaps."""
        live = list(self.items())
        self.heap = []
        for flow in self.flows.values():
            flow.heap = []
        for item in live:
            item.key = key(item)
            entry = (item.key, item.seq, item)
            self.heap.append(entry)
            self.flows[item.fairness_id].heap.append(entry)
        heapq.heapify(self.heap)
        for flow in self.flows.values():
            heapq.heapify(flow.heap)
