"""Parameter checks and metrics freshness for plugins (public through ``epp.plugin``).

Parameters arrive from YAML, so a plugin checks their types itself and raises ``ValueError`` with the
camelCase name the user wrote (the registry turns it into a ``PluginConfigError`` naming the plugin).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from epp.clock import monotonic
from epp.config import Config, parse_duration
from epp.datalayer.endpoint import Endpoint

if TYPE_CHECKING:
    from epp.scheduling.registry import PluginHandle

# --metrics-staleness-threshold's default (GIE's): metrics older than this are not trusted by the scorers.
DEFAULT_SCORER_STALENESS = Config.metrics_staleness_threshold


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(value: Any, name: str, minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value:g}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_str(value: Any, name: str, choices: Sequence[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_duration(value: Any, name: str) -> float:
    """Seconds from a number (seconds) or a Go duration string (``200ms``, ``2s``); must be >= 0."""
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    else:
        seconds = check_float(value, name)
    if seconds < 0:
        raise ValueError(f"{name} must not be negative")
    return seconds


def check_mapping(value: Any, name: str, allowed: Iterable[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    allowed = set(allowed)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
    return value


class FollowsStalenessFlag:
    """Mixed into a plugin whose ``metricsStalenessThreshold`` parameter, when the configuration does not set it,
    follows --metrics-staleness-threshold: the flag reaches the plugin through its handle, which the framework sets
    after ``__init__``, so ``staleness`` is resolved when read (and follows a handle replaced by a live reload)."""

    handle: PluginHandle | None
    own_staleness: float | None = None  # the configured parameter, in seconds; None: the flag's

    def set_staleness(self, value: Any) -> None:
        """Call from ``__init__`` with the parameter as configured (None when not set)."""
        self.own_staleness = None if value is None else check_duration(value, "metricsStalenessThreshold")

    @property
    def staleness(self) -> float:
        if self.own_staleness is not None:
            return self.own_staleness
        handle = self.handle
        return handle.metrics_staleness_threshold if handle is not None else DEFAULT_SCORER_STALENESS


def fresh_mask(endpoints: Sequence[Endpoint], threshold: float, now: float | None = None) -> list[bool]:
    """Per endpoint: are its scraped metrics recent enough to trust? ``threshold`` 0 trusts everything.

    Never-scraped endpoints (``updated_at`` 0) are stale."""
    if threshold <= 0:
        return [True] * len(endpoints)
    now = monotonic() if now is None else now
    return [bool(e.metrics.updated_at) and now - e.metrics.updated_at <= threshold for e in endpoints]


def min_max_inverse(values: Sequence[float]) -> list[float]:
    """1 for the lowest value, 0 for the highest, linear between; all equal -> 1 for all."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
