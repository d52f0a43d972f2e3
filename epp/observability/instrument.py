"""Time every plugin call of the scheduler (``inference_extension_plugin_duration_seconds``).

``instrument(config, metrics)`` wraps the filters, scorers and picker of each scheduling profile,
and the profile handler, in thin timing proxies (``Timed``), whose role methods are the plugin's own
bound methods passed through one mechanism, ``timed``. The plugins themselves are untouched: the proxies
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

from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.observability.metrics import EppMetrics, FastHistogram
from epp.scheduling.plugins import Filter, Picker, Plugin, ProfileHandler, Scorer

PREFIX_SCORER_TYPE = "prefix-cache-scorer"

P = ParamSpec("P")
R = TypeVar("R")


def timed(call: Callable[P, R], hist: FastHistogram) -> Callable[P, R]:
    """``call``, each call's duration observed in ``hist`` (raising calls included)."""
    observe = hist.observe

    def timed_call(*args: P.args, **kwargs: P.kwargs) -> R:
        t0 = perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            observe(perf_counter() - t0)

    return timed_call


class Timed(Plugin):
    """A plugin seen through a timing proxy: the role's ``methods``, bound to ``inner`` and ``timed`` into its
    ``inference_extension_plugin_duration_seconds{extension_point=point}`` child, shadow the role's. One subclass
    per role, so that a proxy still is an instance of the role it stands in for."""

    point: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]

    def __init__(self, inner: Plugin, metrics: EppMetrics) -> None:
        self.inner = inner
        self.name = inner.name
        self.type_name = inner.type_name  # type: ignore[misc]
        self.handle = inner.handle
        hist = metrics.plugin_duration.labels(self.point, inner.type_name or type(inner).__name__, inner.name)
        for method in self.methods:
            setattr(self, method, timed(getattr(inner, method), hist))

    def __repr__(self) -> str:
        return f"Timed({self.inner!r})"


class TimedFilter(Timed, Filter):
    point, methods = "Filter", ("filter",)


class TimedScorer(Timed, Scorer):
    point, methods = "Scorer", ("score",)

    def __init__(self, inner: Scorer, metrics: EppMetrics) -> None:
        super().__init__(inner, metrics)
        self.category = inner.category  # type: ignore[misc]
        if inner.type_name == PREFIX_SCORER_TYPE:
            self.score = _observing_hit_ratio(self.score, inner.name, metrics.prefix_hit_ratio)  # type: ignore[method-assign]


class TimedPicker(Timed, Picker):
    point, methods = "Picker", ("pick",)


class TimedProfileHandler(Timed, ProfileHandler):
    point, methods = "ProfileHandler", ("pick_profiles", "process_results")


def _observing_hit_ratio(score: Callable[[InferenceRequest, list[Endpoint]], Sequence[float]], name: str,
                         hit_ratio: FastHistogram) -> Callable[[InferenceRequest, list[Endpoint]], Sequence[float]]:
    def score_and_observe(request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        scores = score(request, endpoints)
        if scores:
            state = request.attributes.get(name)
            if state:  # the request has at least one block
                ratio = getattr(state, "hit_ratio", None)
                hit_ratio.observe(max(scores) if ratio is None else ratio)
        return scores

    return score_and_observe


T = TypeVar("T", bound=Plugin)


def _wrap(proxy: Callable[[T, EppMetrics], Timed], plugin: T, metrics: EppMetrics) -> T:
    # a proxy is an instance of the role it stands in for (TimedScorer is a Scorer)
    return plugin if isinstance(plugin, Timed) else cast(T, proxy(plugin, metrics))


def instrument(config: Any, metrics: EppMetrics) -> Any:
    """Wrap the plugins ``config.scheduler`` calls in timing proxies (idempotent); returns ``config``."""
    scheduler = config.scheduler
    for profile in scheduler.profiles.values():
        profile.filters = [_wrap(TimedFilter, f, metrics) for f in profile.filters]
        profile.scorers = [(_wrap(TimedScorer, s, metrics), w) for s, w in profile.scorers]
        if profile.picker is not None:
            profile.picker = _wrap(TimedPicker, profile.picker, metrics)
    scheduler.handler = _wrap(TimedProfileHandler, scheduler.handler, metrics)
    return config
