"""Kubernetes label selectors in their string form (``kubectl -l``, llm-d's ``podLabelSelector``).

Requirements are comma-separated and all must hold: ``k=v`` / ``k==v``, ``k!=v`` (also true when ``k`` is
absent), ``k in (a,b)``, ``k notin (a,b)`` (also true when absent), ``k`` (exists), ``!k`` (absent). An empty
selector selects everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = r"[A-Za-z0-9][A-Za-z0-9./_-]*"
_VALUE = r"[A-Za-z0-9._-]*"
_SET = re.compile(rf"({_KEY})\s+(in|notin)\s*\((.*)\)")
_EQ = re.compile(rf"({_KEY})\s*(==|=|!=)\s*({_VALUE})")


@dataclass(frozen=True, slots=True)
class LabelSelector:
    text: str
    requirements: tuple[tuple[str, str, frozenset[str]], ...]  # (key, op, values), op in in|notin|exists|!exists

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, op, values in self.requirements:
            value = labels.get(key)
            if op == "in":
                if value is None or value not in values:
                    return False
            elif op == "notin":
                if value is not None and value in values:
                    return False
            elif op == "exists":
                if value is None:
                    return False
            elif value is not None:  # !exists
                return False
        return True


def _split(text: str) -> list[str]:
    """At the commas outside parentheses (a set's values are comma-separated too)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ')'")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '('")
    parts.append(text[start:])
    return parts


def parse_label_selector(text: str, name: str = "selector") -> LabelSelector:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string like 'app=vllm,role in (decode,both)', got {text!r}")
    if not text.strip():
        return LabelSelector(text, ())
    reqs: list[tuple[str, str, frozenset[str]]] = []
    try:
        parts = _split(text)
    except ValueError as e:
        raise ValueError(f"{name} {text!r}: {e}") from None
    for raw in parts:
        part = raw.strip()
        if m := _SET.fullmatch(part):
            values = [v.strip() for v in m.group(3).split(",")]
            if not all(values) or not all(re.fullmatch(_VALUE, v) for v in values):
                raise ValueError(f"{name} {text!r}: bad value list in {part!r}")
            reqs.append((m.group(1), m.group(2), frozenset(values)))
        elif m := _EQ.fullmatch(part):
            reqs.append((m.group(1), "notin" if m.group(2) == "!=" else "in", frozenset([m.group(3)])))
        elif part.startswith("!") and re.fullmatch(_KEY, part[1:].strip()):
            reqs.append((part[1:].strip(), "!exists", frozenset()))
        elif re.fullmatch(_KEY, part):
            reqs.append((part, "exists", frozenset()))
        else:
            raise ValueError(f"{name} {text!r}: cannot parse requirement {part!r}")
    return LabelSelector(text, tuple(reqs))
