"""``prefix-cache-affinity-filter`` (llm-d): stick to the endpoints that hold the prompt, until they are too busy."""

from __future__ import annotations

import random

from epp.plugin import (
    Endpoint,
    Filter,
    InferenceRequest,
    check_float,
    check_int,
    check_str,
    register_plugin,
)
from epp_plugins.scorers.prefix import PrefixSource, resolve_prefix_source


@register_plugin("prefix-cache-affinity-filter")
class PrefixCacheAffinityFilter(Filter):
    """Keeps the *sticky* endpoints: those holding at least ``affinityThreshold`` (0.80) of the request's
    prefix blocks (and at least ``minMatchTokens`` tokens, default 0). Everything is kept when there is at
    most one candidate, when no endpoint is sticky, with probability ``explorationProbability`` (0), and
    when stickiness costs too much: the best sticky endpoint's estimated time to first token exceeds the
    best other one's by more than ``maxTTFTPenaltyMs`` (18000; 0 = always stick).

    TTFT estimate (ms) = ``(in-flight tokens + this request's prompt tokens not cached there) /
    peakPrefillThroughput (15928 tok/s) * 1000``. EPP's in-flight tokens include each request's expected
    output (``epp.director.estimate_tokens``), so the estimate runs high and stickiness breaks earlier than
    with llm-d's prompt-only count; the request's own uncached prompt is counted so that the sticky
    endpoints get credit for the prefill they save. Reads the prefix match of ``prefixPluginName``
    (default: the only prefix-cache-scorer / approx-prefix-cache-producer)."""

    # ``max_t_t_f_t_penalty_ms`` is how the registry spells llm-d's ``maxTTFTPenaltyMs`` in snake_case.
    def __init__(self, affinity_threshold: float = 0.80, exploration_probability: float = 0.0,
                 max_t_t_f_t_penalty_ms: float = 18000, peak_prefill_throughput: float = 15928,
                 min_match_tokens: int = 0, prefix_plugin_name: str | None = None, seed: int | None = None) -> None:
        self.threshold = check_float(affinity_threshold, "affinityThreshold", 0.0, 1.0, exclusive_minimum=True)
        self.explore = check_float(exploration_probability, "explorationProbability", 0.0, 1.0)
        self.penalty_ms = check_float(max_t_t_f_t_penalty_ms, "maxTTFTPenaltyMs", 0.0)
        self.peak = check_float(peak_prefill_throughput, "peakPrefillThroughput", 0.0, exclusive_minimum=True)
        self.min_tokens = check_int(min_match_tokens, "minMatchTokens", 0)
        self.prefix_name = check_str(prefix_plugin_name, "prefixPluginName") if prefix_plugin_name else None
        self.rng = random.Random(seed)
        self._source: PrefixSource | None = None

    def start(self) -> None:
        self._source = resolve_prefix_source(self, self.prefix_name, required=True)

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        if len(endpoints) <= 1 or self._source is None:
            return endpoints
        prod = self._source.prefix_producer()
        st = prod.state(request, endpoints)
        if not st.hashes:
            return endpoints
        matches = prod.match_all(st, endpoints)
        n = st.blocks
        threshold, min_tokens = self.threshold, self.min_tokens
        sticky = [m > 0 and m / n >= threshold and st.matched_tokens(m) >= min_tokens for m in matches]
        if not any(sticky) or all(sticky):
            return endpoints
        if self.explore and self.rng.random() < self.explore:
            return endpoints
        if self.penalty_ms > 0:
            prompt = st.prompt_tokens
            per_ms = self.peak / 1000.0
            best = {True: float("inf"), False: float("inf")}
            for e, m, s in zip(endpoints, matches, sticky, strict=True):
                ttft = (max(0, e.inflight_tokens) + max(0, prompt - st.matched_tokens(m))) / per_ms
                if ttft < best[s]:
                    best[s] = ttft
            if best[True] - best[False] > self.penalty_ms:
                return endpoints
        return [e for e, s in zip(endpoints, sticky, strict=True) if s]
