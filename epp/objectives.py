"""Per-request policy from the InferenceObjective and InferenceModelRewrite resources.

Discovery (Kubernetes watchers, or tests) keeps this store current; the request path only reads it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """``models`` empty = match every model. Exact matches beat match-all rules."""

    name: str
    models: frozenset[str]
    targets: tuple[RewriteTarget, ...]
    created: float = 0.0  # ties between rules go to the oldest object, as GIE


@dataclass
class Objectives:
    priorities: dict[str, int] = field(default_factory=dict)  # objective name -> priority
    rules: list[RewriteRule] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    def priority(self, objective: str | None) -> int:
        """Unknown or absent objective -> 0; priority < 0 means sheddable."""
        return self.priorities.get(objective, 0) if objective else 0

    def set_rules(self, rules: list[RewriteRule]) -> None:
        self.rules = sorted(rules, key=lambda r: (not r.models, r.created, r.name))

    def rewrite(self, model: str) -> tuple[str, str] | None:
        """(target model, rule name) for ``model``, or None when no rule matches."""
        for rule in self.rules:
            if rule.models and model not in rule.models:
                continue
            targets = rule.targets
            if not targets:
                return None
            total = sum(t.weight for t in targets)
            if total <= 0:
                return self.rng.choice(targets).model, rule.name
            x = self.rng.uniform(0, total)
            for t in targets:
                x -= t.weight
                if x <= 0:
                    return t.model, rule.name
            return targets[-1].model, rule.name
        return None
