"""Predictions audited against outcomes.

Routing rests on predictions: how many prompt tokens an endpoint holds in its prefix cache, how long the
first token will take there. Each completed request that reports the outcome is compared with what was
predicted when it was routed, so a prediction that drifts (a wrong characters-per-token ratio, an index
that forgets or hallucinates, a rate learned on other traffic) shows in the metrics and on ``/debug``
instead of silently steering traffic.

A plugin that predicts exposes ``prediction_audits() -> dict[str, PredictionAudit]`` (name -> audit); the
metrics collector and ``/debug/endpoints`` read every plugin's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

TOKEN_ERROR_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536)
SECONDS_ERROR_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("hit", "miss", "false_hit", "false_miss")  # predicted/actual: hit/hit, miss/miss, hit/miss, miss/hit


class PredictionAudit:
    """Counts and the absolute error of one kind of prediction. ``threshold`` decides what counts as a hit
    (e.g. one KV block of cached tokens) for the confusion counts; ``unit`` names the quantity."""

    __slots__ = ("abs_error", "actual_sum", "bounds", "buckets", "confusion", "count", "predicted_sum", "threshold",
                 "unit")

    def __init__(self, unit: str, bounds: Sequence[float], threshold: float | None = None) -> None:
        self.unit = unit
        self.bounds = tuple(bounds)
        self.threshold = threshold
        self.buckets = [0] * (len(self.bounds) + 1)
        self.confusion = dict.fromkeys(OUTCOMES, 0)
        self.count = 0
        self.abs_error = 0.0
        self.predicted_sum = 0.0
        self.actual_sum = 0.0

    def record(self, predicted: float, actual: float) -> None:
        err = abs(predicted - actual)
        self.count += 1
        self.abs_error += err
        self.predicted_sum += predicted
        self.actual_sum += actual
        self.buckets[bisect_left(self.bounds, err)] += 1
        if self.threshold is not None:
            p, a = predicted >= self.threshold, actual >= self.threshold
            self.confusion["hit" if p and a else "miss" if not p and not a else "false_hit" if p else "false_miss"] += 1

    def summary(self) -> dict[str, Any]:
        n = self.count
        out: dict[str, Any] = {"unit": self.unit, "count": n,
                               "mean_abs_error": round(self.abs_error / n, 4) if n else None,
                               "predicted_over_actual": round(self.predicted_sum / self.actual_sum, 3)
                               if self.actual_sum else None}
        if self.threshold is not None:
            c = self.confusion
            out["confusion"] = dict(c)
            out["accuracy"] = round((c["hit"] + c["miss"]) / n, 4) if n else None
        return out

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets and the sum, as Prometheus histograms carry them."""
        acc, out = 0, []
        for bound, k in zip(self.bounds, self.buckets, strict=False):
            acc += k
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.buckets[-1]))
        return out, self.abs_error


def plugin_audits(config: Any) -> dict[str, PredictionAudit]:
    """Every audit of the configuration's plugins, keyed ``<plugin>/<name>``."""
    out: dict[str, PredictionAudit] = {}
    for plugin in list(getattr(config, "plugins", {}).values()):
        audits = getattr(plugin, "prediction_audits", None)
        if callable(audits):
            for name, audit in audits().items():
                out[f"{plugin.name}/{name}"] = audit
    return out
