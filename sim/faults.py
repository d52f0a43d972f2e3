"""Fault injection state for one pod, driven by `POST /sim/control`."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from epp_sim.errors import ApiError

_METRICS_MODES = ("ok", "error", "slow", "garbage", "empty")


@dataclass(slots=True)
class Faults:
    # True: inference endpoints accept requests and never answer (health and metrics still answer).
    # "all": every endpoint except /sim/* hangs.
    hang: bool | str = False
    metrics: str = "ok"  # ok | error (500) | slow (metrics_delay_s late) | garbage (not Prometheus) | empty
    metrics_delay_s: float = 5.0
    fail_status: int | None = None  # inference endpoints answer this status in the API's error envelope
    fail_rate: float = 1.0  # probability that fail_status applies to a request
    health: str = "ok"  # ok | error (GET /health answers 503)
    delay_ms: float = 0.0  # extra latency before an inference request reaches the engine
    abort_after_tokens: int | None = None  # streaming: cut the connection after this many token events
    # streaming: the end of the response (HTTP/1.1's terminating chunk) follows the last event this much later,
    # as from a server whose event loop is busy between the two writes
    eof_delay_ms: float = 0.0

    def update(self, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise ApiError(400, "control body must be a JSON object")
        if doc.get("reset"):
            fresh = Faults()
            for name in Faults.__slots__:
                setattr(self, name, getattr(fresh, name))
        for key, value in doc.items():
            if key in ("reset", "reset_prefix_cache", "step_time_scale"):
                continue  # handled by the caller (they touch the engine)
            if key not in Faults.__slots__:
                raise ApiError(400, f"unknown control key {key!r}", param=key)
            setattr(self, key, _check(key, value))

    def should_fail(self, rng: random.Random) -> bool:
        return self.fail_status is not None and (self.fail_rate >= 1.0 or rng.random() < self.fail_rate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(key: str, value: Any) -> Any:
    def bad(why: str) -> ApiError:
        return ApiError(400, f"{key}: {why}", param=key)

    if key == "hang":
        if value not in (True, False, "all"):
            raise bad("must be true, false or \"all\"")
    elif key in ("metrics", "health"):
        allowed = _METRICS_MODES if key == "metrics" else ("ok", "error")
        if value not in allowed:
            raise bad(f"must be one of {list(allowed)}")
    elif key == "fail_status":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 400 <= value <= 599):
            raise bad("must be null or an HTTP error status (400-599)")
    elif key == "abort_after_tokens":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise bad("must be null or a non-negative integer")
    elif key in ("metrics_delay_s", "delay_ms", "fail_rate", "eof_delay_ms"):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise bad("must be a non-negative number")
        if key == "fail_rate" and value > 1:
            raise bad("must be between 0 and 1")
        value = float(value)
    return value
