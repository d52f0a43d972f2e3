"""Choose and run the endpoint source named by the flags."""

from __future__ import annotations

from typing import Protocol

from epp.config import Config
from epp.datalayer.pool import EndpointPool
from epp.datalayer.static import StaticFileDiscovery, parse_endpoint_list
from epp.objectives import Objectives


class Discovery(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def is_leader(self) -> bool:
        """Readiness also needs leadership when leader election is on; always True otherwise."""
        ...


class StaticListDiscovery:
    """``--static-endpoints``: a fixed list, synced once."""

    def __init__(self, pool: EndpointPool, text: str) -> None:
        self.pool = pool
        self.specs = parse_endpoint_list(text)

    async def start(self) -> None:
        self.pool.sync(self.specs)

    async def stop(self) -> None:
        pass

    def is_leader(self) -> bool:
        return True


def make_discovery(cfg: Config, pool: EndpointPool, objectives: Objectives) -> Discovery:
    if cfg.static_endpoints:
        return StaticListDiscovery(pool, cfg.static_endpoints)
    if cfg.static_endpoints_file:
        return StaticFileDiscovery(pool, cfg.static_endpoints_file)
    from epp.datalayer.k8s import KubernetesDiscovery  # imported lazily: kubernetes-asyncio is heavy

    return KubernetesDiscovery(cfg, pool, objectives)
