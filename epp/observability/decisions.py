"""A bounded ring buffer of recent routing decisions, for ``/debug/decisions`` and the live page.

Each record is a small dict (no prompt text, no header values): when, which request id and model,
the pick and its fallbacks, how long scheduling took, the explanation when the request was
explained, and, once the response ended, its status, duration and token counts.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool

DEFAULT_SIZE = 256
RECENT = 50  # decisions /debug/decisions returns unless asked for another number
MAX_RECORDED_PATH = 256


def record_path(path: str) -> str:
    """A request path as records, spans and logs keep it: without its query string (clients put API keys
    there) and at most ``MAX_RECORDED_PATH`` characters."""
    return path.partition("?")[0][:MAX_RECORDED_PATH]


class DecisionLog:
    def __init__(self, size: int = DEFAULT_SIZE, pool: EndpointPool | None = None) -> None:
        self.records: deque[dict[str, Any]] = deque(maxlen=max(1, size))
        self.total = 0  # decisions recorded since start
        self.rejected = 0  # requests EPP answered itself
        self.picks: dict[str, int] = {}  # endpoint name -> decisions that picked it (pool members only)
        if pool is not None:
            pool.add_listener(self._forget)

    def _forget(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        kept = {e.name for e in added}
        for e in removed:
            if e.name not in kept:
                self.picks.pop(e.name, None)

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.total += 1
        self.records.append(record)
        name = record.get("endpoint")
        if name:
            self.picks[name] = self.picks.get(name, 0) + 1
        return record

    def add_rejection(self, record: dict[str, Any]) -> None:
        self.rejected += 1
        self.records.append(record)

    def recent(self, limit: int = RECENT) -> list[dict[str, Any]]:
        """Newest first."""
        out = []
        for rec in reversed(self.records):
            if len(out) >= limit:
                break
            out.append(dict(rec))
        return out

    @staticmethod
    def now() -> float:
        return round(time.time(), 3)
