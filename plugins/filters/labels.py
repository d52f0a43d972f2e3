"""Filters on endpoint labels (``Endpoint.labels``: pod labels, or ``labels`` in a static endpoints file)."""

from __future__ import annotations

from typing import Any

from epp.plugin import (
    Endpoint,
    Filter,
    InferenceRequest,
    check_bool,
    check_mapping,
    check_str,
    register_plugin,
)

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _labels(value: Any, name: str) -> dict[str, str]:
    value = value if value is not None else {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping of label -> value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or isinstance(v, (dict, list)) or v is None:
            raise ValueError(f"{name}: {k!r}: label values must be strings")
        out[k] = v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _expressions(value: Any) -> list[tuple[str, str, frozenset[str]]]:
    value = value if value is not None else []
    if not isinstance(value, list):
        raise ValueError("matchExpressions must be a list")
    out = []
    for i, expr in enumerate(value):
        where = f"matchExpressions[{i}]"
        expr = check_mapping(expr, where, {"key", "operator", "values"})
        key = check_str(expr.get("key"), f"{where}.key")
        op = check_str(expr.get("operator"), f"{where}.operator", OPERATORS)
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, (str, int, float)) for v in values):
            raise ValueError(f"{where}.values must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise ValueError(f"{where}: operator {op} needs values")
        if op in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{where}: operator {op} takes no values")
        out.append((key, op, frozenset(str(v) for v in values)))
    return out


@register_plugin("label-selector-filter")
class LabelSelectorFilter(Filter):
    """Keeps the endpoints a Kubernetes label selector selects: every ``matchLabels`` pair equal, and every
    ``matchExpressions`` entry ({key, operator: In|NotIn|Exists|DoesNotExist, values}) true. An empty selector
    keeps everything; no endpoint selected -> the profile fails (no endpoint passed the filters)."""

    def __init__(self, match_labels: Any = None, match_expressions: Any = None) -> None:
        self.match_labels = _labels(match_labels, "matchLabels")
        self.match_expressions = _expressions(match_expressions)

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In":
                if not present or labels[key] not in values:
                    return False
            elif op == "NotIn":
                if present and labels[key] in values:
                    return False
            elif op == "Exists":
                if not present:
                    return False
            elif present:  # DoesNotExist
                return False
        return True

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        return [e for e in endpoints if self.matches(e.labels)]


@register_plugin("by-label-selector")
class ByLabelSelectorFilter(LabelSelectorFilter):
    """llm-d's older form: ``matchLabels`` only."""

    def __init__(self, match_labels: Any = None) -> None:
        super().__init__(match_labels=match_labels)


@register_plugin("by-label")
class ByLabelFilter(Filter):
    """llm-d: keep an endpoint whose ``label`` value is one of ``validValues``, or that lacks the label when
    ``allowsNoLabel``."""

    def __init__(self, label: str | None = None, valid_values: Any = None, allows_no_label: bool = False) -> None:
        self.label = check_str(label, "label")
        values = valid_values if valid_values is not None else []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError("validValues must be a list of strings")
        self.valid = frozenset(values)
        self.allows_no_label = check_bool(allows_no_label, "allowsNoLabel")

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        label, valid, absent_ok = self.label, self.valid, self.allows_no_label
        out = []
        for e in endpoints:
            v = e.labels.get(label)
            if (v is None and absent_ok) or (v is not None and v in valid):
                out.append(e)
        return out


ROLE_LABEL = "llm-d.ai/role"  # llm-d's P/D role of a pod: prefill | decode | both


@register_plugin("prefill-filter")
class PrefillFilter(ByLabelFilter):
    """llm-d: keep pods labelled ``llm-d.ai/role: prefill`` (unlabelled pods are dropped)."""

    def __init__(self) -> None:
        super().__init__(ROLE_LABEL, ["prefill"], allows_no_label=False)


@register_plugin("decode-filter")
class DecodeFilter(ByLabelFilter):
    """llm-d: keep pods labelled ``llm-d.ai/role: decode`` or ``both``, and unlabelled pods (an aggregated
    pool without roles keeps working)."""

    def __init__(self) -> None:
        super().__init__(ROLE_LABEL, ["decode", "both"], allows_no_label=True)
