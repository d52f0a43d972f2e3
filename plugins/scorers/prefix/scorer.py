"""``prefix-cache-scorer``: turns the producer's prefix match into a score, with its own producer when the
configuration has none."""

from __future__ import annotations

from collections.abc import Sequence

from epp.observability.audit import PredictionAudit
from epp.plugin import (
    PREFIX_MATCH,
    Endpoint,
    InferenceRequest,
    PluginConfigError,
    PrefixMatch,
    RequestObserver,
    ResponseInfo,
    SchedulingResult,
    Scorer,
    check_float,
    check_int,
    check_str,
    register_plugin,
)
from epp_plugins.scorers.prefix.producer import ApproxPrefixCacheProducer

SCORE_MODES = ("tokens", "ratio")


@register_plugin("prefix-cache-scorer")
class PrefixCacheScorer(Scorer, RequestObserver):
    """Score from the prefix match.

    ``scoreMode: tokens`` (default): the prefill the endpoint saves *compared with the candidate that saves
    least*, ``min(1, (matchedTokens - leastMatchedTokens) / matchLengthScaleTokens)`` (scale 1024 tokens,
    about one engine step of prefill on an H100-class GPU serving an 8B model). Measuring in tokens, a 100%
    match on a 20-token prompt scores 0.02 where 90% of an 8,000-token prompt scores 1. Measuring against the
    least, what every candidate holds (a system prompt cached everywhere) does not count: holding a chat's
    history beyond the shared prompt scores 1 and outweighs one waiting request on GIE's min-max
    queue-scorer, which GIE's ratio (history 0.9 against 0.5 elsewhere) does not.
    ``scoreMode: ratio``: GIE's ``matchedBlocks / totalBlocks``. ``matchLengthWeight`` (llm-d's parameter)
    selects llm-d's blend ``w * min(1, matchedTokens / scale)^2 + (1 - w) * ratio`` instead (scale 8192).
    """

    uses_response_body = True  # its own producer's: a conversation's answer (approx-prefix-cache-producer)

    produces = (PREFIX_MATCH,)

    category = "affinity"

    def __init__(self, score_mode: str | None = None, match_length_scale_tokens: int | None = None,
                 match_length_weight: float | None = None, prefix_match_info_producer_name: str | None = None,
                 block_size_tokens: int | None = None, max_prefix_blocks_to_match: int | None = None,
                 max_prefix_tokens_to_match: int | None = None, lru_capacity_per_server: int | None = None,
                 auto_tune: bool | None = None, tokenizer: str | None = None,
                 cached_tokens_feedback: bool | None = None) -> None:
        if score_mode is not None and match_length_weight is not None:
            raise ValueError("set either scoreMode or matchLengthWeight (llm-d's blend), not both")
        self.mode = check_str(score_mode, "scoreMode", SCORE_MODES) if score_mode is not None else "tokens"
        # Default scale: ours for tokens mode, llm-d's (8192) for its blend.
        default_scale = 8192 if match_length_weight is not None else 1024
        self.scale = check_int(match_length_scale_tokens if match_length_scale_tokens is not None else default_scale,
                               "matchLengthScaleTokens", 1)
        self.weight = (check_float(match_length_weight, "matchLengthWeight", 0.0, 1.0)
                       if match_length_weight is not None else None)
        self.producer_name = (check_str(prefix_match_info_producer_name, "prefixMatchInfoProducerName")
                              if prefix_match_info_producer_name is not None else None)
        given = {"block_size_tokens": block_size_tokens, "max_prefix_blocks_to_match": max_prefix_blocks_to_match,
                 "max_prefix_tokens_to_match": max_prefix_tokens_to_match,
                 "lru_capacity_per_server": lru_capacity_per_server, "auto_tune": auto_tune,
                 "tokenizer": tokenizer, "cached_tokens_feedback": cached_tokens_feedback}
        self._own_params = sorted(k for k, v in given.items() if v is not None)
        self._own = ApproxPrefixCacheProducer(**{k: v for k, v in given.items() if v is not None})
        self.producer: ApproxPrefixCacheProducer = self._own

    def start(self) -> None:
        handle = self.handle
        external: ApproxPrefixCacheProducer | None = None
        if handle is not None:
            if self.producer_name is not None:
                found = handle.plugin(self.producer_name)
                if not isinstance(found, ApproxPrefixCacheProducer):
                    raise PluginConfigError(f"plugin {self.name!r}: prefixMatchInfoProducerName "
                                            f"{self.producer_name!r} is not an approx-prefix-cache-producer")
                external = found
            else:
                producers = handle.plugins_of(ApproxPrefixCacheProducer)
                if len(producers) > 1:
                    raise PluginConfigError(f"plugin {self.name!r}: several approx-prefix-cache-producer plugins; "
                                            "choose one with prefixMatchInfoProducerName")
                external = producers[0] if producers else None
        elif self.producer_name is not None:
            raise PluginConfigError(f"plugin {self.name!r}: prefixMatchInfoProducerName needs a configuration")
        if external is not None:
            if self._own_params:
                raise PluginConfigError(f"plugin {self.name!r}: {external.name!r} produces the prefix match; set "
                                        f"{[_camel(p) for p in self._own_params]} on it, not on the scorer")
            self.producer = external
        else:
            self._own.name = f"{self.name}/producer"
            self._own.handle = handle
            self._own.start()

    def stop(self) -> None:
        if self.producer is self._own:
            self._own.stop()

    def prefix_producer(self) -> ApproxPrefixCacheProducer:
        return self.producer

    def indexer_size(self) -> int:
        return self._own.indexer_size() if self.producer is self._own else 0

    def prediction_audits(self) -> dict[str, PredictionAudit]:
        return self._own.prediction_audits() if self.producer is self._own else {}

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        prod = self.producer
        st = prod.state(request, endpoints)
        request.attributes[self.name] = st  # truthy when the request has blocks; .hit_ratio for metrics
        if not st.hashes:
            return [0.0] * len(endpoints)
        matches = prod.match_all(st, endpoints)
        PREFIX_MATCH.put(request, PrefixMatch(st.prompt_tokens, {e.name: st.matched_tokens(m)
                                                                 for e, m in zip(endpoints, matches, strict=True)}))
        n = st.blocks
        if self.weight is not None:
            w, scale = self.weight, self.scale
            return [w * min(1.0, st.matched_tokens(m) / scale) ** 2 + (1 - w) * m / n for m in matches]
        if self.mode == "ratio":
            return [m / n for m in matches]
        tokens = [st.matched_tokens(m) for m in matches]
        least = min(tokens)
        scale = self.scale
        return [min(1.0, (t - least) / scale) for t in tokens]

    # The observer hooks run the embedded producer's; an external producer is an observer itself.
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.producer is self._own:
            self._own.pre_request(request, result)

    def on_response_body(self, request: InferenceRequest, endpoint: Endpoint, chunk: bytes,
                         end_of_stream: bool) -> None:
        if self.producer is self._own:
            self._own.on_response_body(request, endpoint, chunk, end_of_stream)

    def on_response_complete(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        if self.producer is self._own:
            self._own.on_response_complete(request, endpoint, response)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w.title() for w in rest)
