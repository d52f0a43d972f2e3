"""Why an endpoint was picked: per-endpoint totals, the per-scorer breakdown and the winning margin.

Who may ask (``ExplainPolicy``):

* ``--explain-decisions``: every request is explained (an operator's debugging switch; the client then
  sees endpoint names and scores in the ``x-epp-decision`` response header).
* otherwise a request is explained when it carries ``x-epp-explain: <token>`` and the token equals
  ``--explain-token`` (or the ``EPP_EXPLAIN_TOKEN`` environment variable, which keeps the secret out
  of the process list). The comparison is constant-time, and EPP always removes ``x-epp-explain``
  from the request before it goes upstream, so model servers never see the token.

A shared secret and not a source-address allow-list: EPP does not see the client's address, and
``x-forwarded-for`` / ``x-envoy-external-address`` can only be trusted when the proxy in front is
configured to overwrite them (``use_remote_address``, trusted hops), which EPP cannot check. A token
works whatever the proxy configuration is.

An explanation is bounded: at most ``MAX_ENDPOINTS`` endpoints (the best totals) are listed.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

EXPLAIN_HEADER = "x-epp-explain"  # request: ask for an explanation (value: the token)
DECISION_RESPONSE_HEADER = "x-epp-decision"  # response: the explanation, compact JSON
SCORES_KEY = "x-gateway-destination-endpoint-scores"  # envoy.lb metadata: hostport -> total (llm-d's key)
DECISION_KEY = "x-epp-decision"  # envoy.lb metadata: the explanation as a struct
TOKEN_ENV = "EPP_EXPLAIN_TOKEN"
MAX_ENDPOINTS = 16  # listed per explanation (header, metadata, decision log)
MAX_HEADER_ENDPOINTS = 8  # in the response header, which must stay small


class ExplainPolicy:
    def __init__(self, always: bool = False, token: str = "") -> None:
        self.always = always
        token = token or os.environ.get(TOKEN_ENV, "")
        self._token = token.encode() if token else b""
        if token and len(token) < 16:
            log.warning("--explain-token is shorter than 16 characters: easy to guess")

    @property
    def per_request(self) -> bool:
        return bool(self._token)

    def allows(self, headers: Mapping[str, str]) -> bool:
        if self.always:
            return True
        if not self._token:
            return False
        value = headers.get(EXPLAIN_HEADER)
        return value is not None and hmac.compare_digest(value.encode(), self._token)


def _r(x: float) -> float:
    return round(x, 4)


def explain(result: Any, weights: Mapping[str, float], picked: str) -> dict[str, Any] | None:
    """The explanation of a scheduling result computed with ``explain=True``; None without a breakdown.

    ``{"profile", "pick", "margin", "weights": {scorer: w}, "scores": {endpoint: {"total": t, scorer: s}}}``,
    endpoints best total first. ``margin`` is the picked endpoint's total minus the best other
    total (negative when a random picker chose a lower score; absent with a single candidate).
    """
    profile = result.primary_profile
    pr = result.profile_results.get(profile)
    if pr is None or not pr.scores:
        return None
    breakdown: dict[str, dict[str, float]] = pr.scores
    totals = breakdown.get("total", {})
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    margin = None
    if picked in totals and len(totals) > 1:
        best_other = max(t for name, t in totals.items() if name != picked)
        margin = _r(totals[picked] - best_other)
    scorers = [name for name in breakdown if name != "total"]
    listed = [name for name, _ in ranked[:MAX_ENDPOINTS]]
    if picked in totals and picked not in listed:
        listed[-1] = picked
    scores = {}
    for name in listed:
        entry = {"total": _r(totals[name])}
        for s in scorers:
            v = breakdown[s].get(name)
            if v is not None:
                entry[s] = _r(v)
        scores[name] = entry
    return {"profile": profile, "pick": picked, "margin": margin, "candidates": len(totals),
            "weights": {s: weights.get(s, 1.0) for s in scorers}, "scores": scores}


def header_value(explanation: Mapping[str, Any]) -> str:
    """Compact JSON for the ``x-epp-decision`` response header (the best few endpoints only)."""
    scores = explanation["scores"]
    if len(scores) > MAX_HEADER_ENDPOINTS:
        keep = list(scores)[:MAX_HEADER_ENDPOINTS]
        if explanation["pick"] in scores and explanation["pick"] not in keep:
            keep[-1] = explanation["pick"]
        explanation = {**explanation, "scores": {k: scores[k] for k in keep}}
    return json.dumps(explanation, separators=(",", ":"), ensure_ascii=True)
