"""Time every plugin call of the scheduler (``inference_extension_plugin_duration_seconds``).

``instrument(config, metrics)`` wraps the filters, scorers and picker of each scheduling profile,
and the profile handler, in thin timing proxies. The plugins themselves are untouched: the proxies
forward ``name``/``type_name``/``category`` and the call, so explanations and logs still name the
real plugin. A call costs two ``perf_counter`` reads and a lock-free histogram observation (a
``FastHistogram`` child resolved once, at wrap time).

The prefix-cache scorer also feeds ``inference_extension_prefix_indexer_hit_ratio``: after scoring,
``request.attributes[<scorer name>]`` holds the request's prefix state, truthy when the request has
at least one block, whose ``hit_ratio`` is the best match over the candidates as a fraction of the
request's blocks (a state without ``hit_ratio``: the best score, GIE's ratio mode). Requests too short
to have a block are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import Any

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.observability.metrics import EppMetrics, FastHistogram
from epp.scheduling.plugins import (
    Filter,
    Picker,
    Plugin,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)

PREFIX_SCORER_TYPE = "prefix-cache-scorer"


class _Timed:
    inner: Any

    def _bind(self, inner: Plugin, hist: FastHistogram) -> None:
        self.inner = inner
        self.hist = hist
        self.name = inner.name
        self.type_name = inner.type_name  # type: ignore[misc]
        self.handle = inner.handle

    def __repr__(self) -> str:
        return f"Timed({self.inner!r})"


class TimedFilter(_Timed, Filter):
    def __init__(self, inner: Filter, hist: FastHistogram) -> None:
        self._bind(inner, hist)

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        t0 = perf_counter()
        try:
            return self.inner.filter(request, endpoints)
        finally:
            self.hist.observe(perf_counter() - t0)


class TimedScorer(_Timed, Scorer):
    def __init__(self, inner: Scorer, hist: FastHistogram, hit_ratio: FastHistogram | None = None) -> None:
        self._bind(inner, hist)
        self.category = inner.category  # type: ignore[misc]
        self.hit_ratio = hit_ratio

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        t0 = perf_counter()
        try:
            scores = self.inner.score(request, endpoints)
        finally:
            self.hist.observe(perf_counter() - t0)
        if self.hit_ratio is not None and scores:
            state = request.attributes.get(self.name)
            if state:  # the request has at least one block
                ratio = getattr(state, "hit_ratio", None)
                self.hit_ratio.observe(max(scores) if ratio is None else ratio)
        return scores


class TimedPicker(_Timed, Picker):
    def __init__(self, inner: Picker, hist: FastHistogram) -> None:
        self._bind(inner, hist)

    def pick(self, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        t0 = perf_counter()
        try:
            return self.inner.pick(request, scored)
        finally:
            self.hist.observe(perf_counter() - t0)


class TimedProfileHandler(_Timed, ProfileHandler):
    def __init__(self, inner: ProfileHandler, hist: FastHistogram) -> None:
        self._bind(inner, hist)

    def pick_profiles(self, request: InferenceRequest, profiles: Mapping[str, Any],
                      results: Mapping[str, ProfileResult | None]) -> dict[str, Any]:
        t0 = perf_counter()
        try:
            return self.inner.pick_profiles(request, profiles, results)
        finally:
            self.hist.observe(perf_counter() - t0)

    def process_results(self, request: InferenceRequest,
                        results: dict[str, ProfileResult | None]) -> SchedulingResult:
        t0 = perf_counter()
        try:
            return self.inner.process_results(request, results)
        finally:
            self.hist.observe(perf_counter() - t0)


def _hist(metrics: EppMetrics, point: str, plugin: Plugin) -> FastHistogram:
    return metrics.plugin_duration.labels(point, plugin.type_name or type(plugin).__name__, plugin.name)


def instrument(config: Any, metrics: EppMetrics) -> Any:
    """Wrap the plugins ``config.scheduler`` calls in timing proxies (idempotent); returns ``config``."""
    scheduler = config.scheduler
    for profile in scheduler.profiles.values():
        profile.filters = [f if isinstance(f, _Timed) else TimedFilter(f, _hist(metrics, "Filter", f))
                           for f in profile.filters]
        profile.scorers = [
            (s if isinstance(s, _Timed) else TimedScorer(
                s, _hist(metrics, "Scorer", s),
                metrics.prefix_hit_ratio if s.type_name == PREFIX_SCORER_TYPE else None), w)
            for s, w in profile.scorers]
        if profile.picker is not None and not isinstance(profile.picker, _Timed):
            profile.picker = TimedPicker(profile.picker, _hist(metrics, "Picker", profile.picker))
    if not isinstance(scheduler.handler, _Timed):
        scheduler.handler = TimedProfileHandler(scheduler.handler, _hist(metrics, "ProfileHandler",
                                                                         scheduler.handler))
    return config
