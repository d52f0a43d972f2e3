"""Requests in flight per priority level, and the most seen in flight at once recently: what a usage-limit policy
can keep room for (``UsageLimitPolicy.reserve``)."""

from __future__ import annotations

import math
from collections import deque

from epp.clock import monotonic

BUCKET = 1.0  # seconds per peak bucket
KEEP = 120  # buckets kept: the longest window a policy can ask for


class Demand:
    def __init__(self) -> None:
        self._inflight: dict[int, int] = {}
        self._peaks: dict[int, deque[list[float]]] = {}  # priority -> [bucket start, most in flight then]

    def started(self, priority: int) -> None:
        n = self._inflight[priority] = self._inflight.get(priority, 0) + 1
        start = math.floor(monotonic() / BUCKET) * BUCKET
        peaks = self._peaks.setdefault(priority, deque(maxlen=KEEP))
        if peaks and peaks[-1][0] == start:
            peaks[-1][1] = max(peaks[-1][1], n)
        else:
            peaks.append([start, n])

    def ended(self, priority: int) -> None:
        self._inflight[priority] = max(0, self._inflight.get(priority, 0) - 1)

    def inflight(self, priority: int) -> int:
        return self._inflight.get(priority, 0)

    def peak(self, priority: int, window: float) -> int:
        """The most requests of ``priority`` in flight at once over the last ``window`` seconds."""
        horizon = monotonic() - window - BUCKET
        return int(max((n for start, n in self._peaks.get(priority, ()) if start >= horizon),
                       default=self.inflight(priority)))

    def priorities(self) -> list[int]:
        return list(self._peaks)
