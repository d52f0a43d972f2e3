"""Pickers: choose the endpoint(s) from the scored candidates, best first."""

from __future__ import annotations

import random

from epp.plugin import Endpoint, InferenceRequest, Picker, ScoredEndpoint, register_plugin


def _check_count(n: object) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError("maxNumOfEndpoints must be an integer >= 1")
    return n


@register_plugin("max-score-picker")
class MaxScorePicker(Picker):
    """Highest total score wins; ties are broken uniformly at random. With ``maxNumOfEndpoints`` > 1
    the next best follow as fallbacks."""

    def __init__(self, max_num_of_endpoints: int = 1, seed: int | None = None) -> None:
        self.k = _check_count(max_num_of_endpoints)
        self.rng = random.Random(seed)

    def pick(self, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if self.k == 1:  # the hot path: one pass, reservoir-style tie-break
            best: Endpoint | None = None
            best_score = float("-inf")
            ties = 0
            for s in scored:
                if s.score > best_score:
                    best, best_score, ties = s.endpoint, s.score, 1
                elif s.score == best_score:
                    ties += 1
                    if self.rng.randrange(ties) == 0:
                        best = s.endpoint
            return [best] if best is not None else []
        shuffled = list(scored)
        self.rng.shuffle(shuffled)
        shuffled.sort(key=lambda s: s.score, reverse=True)  # stable: shuffle order breaks ties
        return [s.endpoint for s in shuffled[: self.k]]


@register_plugin("random-picker")
class RandomPicker(Picker):
    """Uniformly random, ignoring scores."""

    def __init__(self, max_num_of_endpoints: int = 1, seed: int | None = None) -> None:
        self.k = _check_count(max_num_of_endpoints)
        self.rng = random.Random(seed)

    def pick(self, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        return [s.endpoint for s in self.rng.sample(scored, min(self.k, len(scored)))]


@register_plugin("weighted-random-picker")
class WeightedRandomPicker(Picker):
    """Random in proportion to score (A-Res weighted sampling without replacement). Endpoints with a
    score of 0 are only chosen to fill ``maxNumOfEndpoints``; all zero -> uniform."""

    def __init__(self, max_num_of_endpoints: int = 1, seed: int | None = None) -> None:
        self.k = _check_count(max_num_of_endpoints)
        self.rng = random.Random(seed)

    def pick(self, request: InferenceRequest, scored: list[ScoredEndpoint]) -> list[Endpoint]:
        if all(s.score <= 0 for s in scored):
            return [s.endpoint for s in self.rng.sample(scored, min(self.k, len(scored)))]
        keyed = []
        for s in scored:
            u = self.rng.random() or 1e-10
            keyed.append((u ** (1.0 / s.score) if s.score > 0 else 0.0, s.endpoint))
        keyed.sort(key=lambda kv: kv[0], reverse=True)
        return [e for _, e in keyed[: self.k]]
