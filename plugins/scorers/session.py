"""Session affinity (llm-d): keep a conversation on the endpoint that served its previous turns.

Strategies (``strategy``):

* ``encoded_endpoint_header`` (default): the request header ``encodedEndpointHeaderConfig.header``
  (default ``x-session-token``) carries base64 of the endpoint: its name, ``namespace/name`` (llm-d's
  form) or ``ip:port``. Stateless. After the pick, the token of the chosen endpoint is offered in
  ``request.response_headers`` for the client's next turn.
* ``session_id``: the first non-empty of ``sessionIdConfig.sources`` (each ``{header: name}`` or
  ``{attribute: key}``; default ``[{header: x-session-id}]``) is bound server-side to the endpoint picked
  for it; a binding unused for ``evictionTtlSeconds`` (300; 0 = never) is dropped, checked every
  ``evictionSweepSeconds`` (10).

``profileName`` binds the target of that profile instead of the primary one (e.g. ``prefill``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

from epp.plugin import (
    Endpoint,
    InferenceRequest,
    RequestObserver,
    SchedulingResult,
    Scorer,
    check_float,
    check_mapping,
    check_str,
    monotonic,
    register_plugin,
)

STRATEGIES = ("encoded_endpoint_header", "session_id")


def encode_endpoint(endpoint: Endpoint) -> str:
    return base64.b64encode(endpoint.name.encode()).decode()


def _decode(token: str) -> str | None:
    token = token.strip()
    if not token:
        return None
    padded = (token + "=" * (-len(token) % 4)).encode()
    for alt in (None, b"-_"):
        try:
            return base64.b64decode(padded, altchars=alt, validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            continue
    return None


class SessionAffinity(RequestObserver):
    """The state and lookup shared by ``session-affinity-scorer`` and ``session-affinity-filter``."""

    def __init__(self, strategy: str = "encoded_endpoint_header", profile_name: str | None = None,
                 encoded_endpoint_header_config: Any = None, session_id_config: Any = None) -> None:
        self.strategy = check_str(strategy, "strategy", STRATEGIES)
        self.profile = check_str(profile_name, "profileName") if profile_name is not None else None
        enc = check_mapping(encoded_endpoint_header_config, "encodedEndpointHeaderConfig", {"header"})
        self.header = check_str(enc.get("header", "x-session-token"), "encodedEndpointHeaderConfig.header").lower()
        sid = check_mapping(session_id_config, "sessionIdConfig",
                            {"sources", "evictionTtlSeconds", "evictionSweepSeconds"})
        sources = sid.get("sources", [{"header": "x-session-id"}])
        if not isinstance(sources, list) or not sources:
            raise ValueError("sessionIdConfig.sources must be a non-empty list")
        self.sources: list[tuple[str, str]] = []
        for i, src in enumerate(sources):
            src = check_mapping(src, f"sessionIdConfig.sources[{i}]", {"header", "attribute"})
            if len(src) != 1:
                raise ValueError(f"sessionIdConfig.sources[{i}] must set exactly one of header, attribute")
            ((kind, value),) = src.items()
            value = check_str(value, f"sessionIdConfig.sources[{i}].{kind}")
            self.sources.append((kind, value.lower() if kind == "header" else value))
        self.ttl = check_float(sid.get("evictionTtlSeconds", 300), "sessionIdConfig.evictionTtlSeconds", 0.0)
        self.sweep = check_float(sid.get("evictionSweepSeconds", 10), "sessionIdConfig.evictionSweepSeconds", 0.0,
                                 exclusive_minimum=True)
        self._bindings: dict[str, tuple[str, float]] = {}  # session id -> (endpoint name, last used)
        self._last_sweep = monotonic()

    # -- lookups ---------------------------------------------------------------------------------

    def session_id(self, request: InferenceRequest) -> str | None:
        for kind, key in self.sources:
            value = request.headers.get(key) if kind == "header" else request.attributes.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    def bound_index(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> int | None:
        """Index in ``endpoints`` of the endpoint the request's session is bound to, if it is there."""
        if self.strategy == "encoded_endpoint_header":
            raw = request.headers.get(self.header)
            target = _decode(raw) if raw else None
            if not target:
                return None
            for i, e in enumerate(endpoints):
                if target == e.name or target.endswith("/" + e.name) or target == e.hostport:
                    return i
            return None
        sid = self.session_id(request)
        if sid is None:
            return None
        now = monotonic()
        self._maybe_sweep(now)
        bound = self._bindings.get(sid)
        if bound is None or (self.ttl and now - bound[1] > self.ttl):
            return None
        for i, e in enumerate(endpoints):
            if e.name == bound[0]:
                return i
        return None

    def _maybe_sweep(self, now: float) -> None:
        if not self.ttl or now - self._last_sweep < self.sweep:
            return
        self._last_sweep = now
        expired = [k for k, (_, used) in self._bindings.items() if now - used > self.ttl]
        for k in expired:
            del self._bindings[k]

    def sessions(self) -> int:
        return len(self._bindings)

    # -- after the pick --------------------------------------------------------------------------

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        res = result.profile_results.get(self.profile or result.primary_profile)
        if not res or not res.endpoints:
            return
        target = res.endpoints[0]
        if self.strategy == "encoded_endpoint_header":
            request.response_headers[self.header] = encode_endpoint(target)  # for the client's next turn
            return
        sid = self.session_id(request)
        if sid is not None:
            self._bindings[sid] = (target.name, monotonic())


@register_plugin("session-affinity-scorer")
class SessionAffinityScorer(SessionAffinity, Scorer):
    """1 for the endpoint the session is bound to, 0 for the others (all 0 without a binding)."""

    category = "affinity"

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        scores = [0.0] * len(endpoints)
        i = self.bound_index(request, endpoints)
        if i is not None:
            scores[i] = 1.0
        return scores
