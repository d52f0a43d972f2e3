"""``no-hit-lru-scorer`` (llm-d): spread requests that hit no prefix cache anywhere, so cache growth is balanced."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from epp.plugin import (
    Endpoint,
    InferenceRequest,
    RequestObserver,
    SchedulingResult,
    Scorer,
    check_int,
    check_str,
    register_plugin,
)
from epp_plugins.scorers.prefix import PrefixSource, resolve_prefix_source


@register_plugin("no-hit-lru-scorer")
class NoHitLruScorer(Scorer, RequestObserver):
    """A request is *cold* when no candidate holds any block of its prompt (or it is too short to have one).
    Warm request: 0.5 for every candidate (neutral). Cold request over N candidates (N = 1 -> 1.0):
    endpoints that never took a cold request first, the i-th (candidate order) scoring ``1 - i/(N-1)``;
    then the others by how long ago they took one, the one at position p of the LRU (oldest first) scoring
    ``1 - (neverUsed + p)/(N-1)``, floored at 0. After the pick, a cold request's endpoint (and the
    ``prefillProfile`` profile's) becomes the most recently used; an endpoint whose server restarted (its cache
    emptied) counts as never used again. Reads the prefix match of
    ``prefixPluginName`` (a prefix-cache-scorer or approx-prefix-cache-producer; default: the only one)."""

    def __init__(self, prefix_plugin_name: str | None = None, lru_size: int = 1024,
                 prefill_profile: str = "prefill") -> None:
        self.prefix_name = check_str(prefix_plugin_name, "prefixPluginName") if prefix_plugin_name else None
        self.lru_size = check_int(lru_size, "lruSize", 1)
        self.prefill_profile = check_str(prefill_profile, "prefillProfile")
        self._lru: OrderedDict[str, None] = OrderedDict()  # endpoint name, least recently used first
        self._source: PrefixSource | None = None

    def start(self) -> None:
        self._source = resolve_prefix_source(self, self.prefix_name, required=True)
        if self.handle is not None and self.handle.pool is not None:
            self.handle.pool.add_restart_listener(self._forget_restarted)

    def stop(self) -> None:
        if self.handle is not None and self.handle.pool is not None:
            self.handle.pool.remove_restart_listener(self._forget_restarted)

    def _forget_restarted(self, endpoint: Endpoint, last_seen: float) -> None:
        # the cold prompts it took are gone with its cache: it counts as never used, first for the next cold one
        self._lru.pop(endpoint.name, None)

    def _is_cold(self, request: InferenceRequest, endpoints: list[Endpoint]) -> bool:
        if self._source is None:
            return True
        prod = self._source.prefix_producer()
        st = prod.state(request, endpoints)
        return not any(prod.match_all(st, endpoints))

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        n = len(endpoints)
        cold = self._is_cold(request, endpoints)
        request.attributes[self.name] = cold
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        position = {name: i for i, name in enumerate(self._lru)}
        never = [i for i, e in enumerate(endpoints) if e.name not in position]
        scores = [0.0] * n
        for rank, i in enumerate(never):
            scores[i] = 1.0 - rank / (n - 1)
        for i, e in enumerate(endpoints):
            p = position.get(e.name)
            if p is not None:
                scores[i] = max(0.0, 1.0 - (len(never) + p) / (n - 1))
        return scores

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if not request.attributes.get(self.name):
            return
        for profile in (result.primary_profile, self.prefill_profile):
            res = result.profile_results.get(profile)
            if res and res.endpoints:
                name = res.endpoints[0].name
                self._lru[name] = None
                self._lru.move_to_end(name)
        while len(self._lru) > self.lru_size:
            self._lru.popitem(last=False)
