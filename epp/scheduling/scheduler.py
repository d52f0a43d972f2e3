"""Run scheduling profiles: filters -> weighted scorers -> picker."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.api.errors import EppError
from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.plugins import (
    Filter,
    Picker,
    ProfileHandler,
    ProfileResult,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)


@dataclass(slots=True)
class SchedulerProfile:
    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[tuple[Scorer, float]] = field(default_factory=list)
    picker: Picker | None = None

    def run(self, request: InferenceRequest, candidates: list[Endpoint], explain: bool = False) -> ProfileResult | None:
        endpoints = candidates
        for f in self.filters:
            endpoints = f.filter(request, endpoints)
            if not endpoints:
                return None
        totals = [0.0] * len(endpoints)
        breakdown: dict[str, dict[str, float]] | None = {} if explain else None
        for scorer, weight in self.scorers:
            scores = scorer.score(request, endpoints)
            if len(scores) != len(endpoints):
                raise RuntimeError(f"scorer {scorer.name}: {len(scores)} scores for {len(endpoints)} endpoints")
            for i, s in enumerate(scores):
                s = 0.0 if s != s or s < 0.0 else (1.0 if s > 1.0 else s)  # clamp, NaN -> 0
                totals[i] += weight * s
                if breakdown is not None:
                    breakdown.setdefault(scorer.name, {})[endpoints[i].name] = s
        assert self.picker is not None
        scored = [ScoredEndpoint(e, t) for e, t in zip(endpoints, totals, strict=True)]
        picked = self.picker.pick(request, scored)
        if not picked:
            return None
        if breakdown is not None:
            breakdown["total"] = {e.name: t for e, t in zip(endpoints, totals, strict=True)}
        return ProfileResult(picked, breakdown)


class Scheduler:
    def __init__(self, profiles: dict[str, SchedulerProfile], handler: ProfileHandler) -> None:
        self.profiles = profiles
        self.handler = handler

    def schedule(self, request: InferenceRequest, candidates: list[Endpoint],
                 explain: bool = False) -> SchedulingResult:
        results: dict[str, ProfileResult | None] = {}
        for _ in range(len(self.profiles) + 1):  # each profile runs at most once
            todo = self.handler.pick_profiles(request, self.profiles, results)
            todo = {n: p for n, p in todo.items() if n not in results}
            if not todo:
                break
            for name, profile in todo.items():
                results[name] = profile.run(request, candidates, explain)
        result = self.handler.process_results(request, results)
        if not result.endpoints:
            raise EppError(429, "scheduling-failed", "failed to find target endpoint: no endpoint passed the filters")
        return result
