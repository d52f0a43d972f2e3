"""tenant-scorer: a tenant's requests go to its reserved endpoints; other requests avoid them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp.plugin import Endpoint, InferenceRequest, Scorer, check_str, register_plugin


@register_plugin("tenant-scorer")
class TenantScorer(Scorer):
    """Score 1 for the endpoints reserved for the request's tenant (``host:port``), 0 for the others; a request
    of no known tenant scores 1 on the unreserved endpoints, so reserved capacity stays free."""

    category = "affinity"

    def __init__(self, tenants: Mapping[str, Sequence[str]] | None = None, header: str = "x-tenant") -> None:
        self.header = check_str(header, "header").lower()
        if not isinstance(tenants, Mapping) or not tenants:
            raise ValueError("tenants must map a tenant name to a list of host:port")
        self.tenants: dict[str, frozenset[str]] = {}
        for name, hostports in tenants.items():
            if not isinstance(hostports, list) or not all(isinstance(h, str) and ":" in h for h in hostports):
                raise ValueError(f"tenants.{name} must be a list of host:port, got {hostports!r}")
            self.tenants[name] = frozenset(hostports)
        self.reserved = frozenset().union(*self.tenants.values())

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> list[float]:
        mine = self.tenants.get(request.headers.get(self.header, ""))
        if mine is not None:
            return [1.0 if e.hostport in mine else 0.0 for e in endpoints]
        return [0.0 if e.hostport in self.reserved else 1.0 for e in endpoints]

