"""``session-affinity-filter`` (llm-d): pin a session to its endpoint (see ``epp_plugins.scorers.session``)."""

from __future__ import annotations

from epp.plugin import Endpoint, Filter, InferenceRequest, register_plugin
from epp_plugins.scorers.session import SessionAffinity


@register_plugin("session-affinity-filter")
class SessionAffinityFilter(SessionAffinity, Filter):
    """Only the bound endpoint when it is a candidate; every candidate otherwise (new session, bound endpoint
    gone or filtered out)."""

    def filter(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[Endpoint]:
        i = self.bound_index(request, endpoints)
        return endpoints if i is None else [endpoints[i]]
