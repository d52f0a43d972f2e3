"""One EPP for many pools (``--pools-file``): each pool its own endpoints, scheduling profile, data layer, metrics,
readiness and shared state; the pool of a request is named by the gateway, never by the client.

The gateway's route for a pool names it in one of two ways, neither of which a client can forge:

* route metadata: dynamic metadata ``epp: {pool: <name>}`` (or ``envoy.lb: {x-epp-pool: <name>}``, for gateways
  that forward only ``envoy.lb``), which ext_proc sends in ``metadata_context`` when the namespace is in its
  ``metadata_options.forwarding_namespaces.untyped``. Envoy 1.40 forwards dynamic metadata only, not a route's own
  ``metadata``: a route sets it with the ``envoy.filters.http.set_metadata`` filter's per-route config
  (``typed_per_filter_config``), the filter placed before ext_proc (epp.stack.envoy, ``route_metadata``);
* a header: ``x-epp-pool: <name>``, set by the route after stripping any client's copy (the rig's Envoy does both
  before ext_proc: ``STRIPPED_REQUEST_HEADERS`` and ``route_headers``).

Route metadata wins over the header. A request that names no pool goes to the pool marked ``default: true``, if
any, and is refused (400 unknown-pool) otherwise, as is one naming a pool EPP does not serve.

File format::

    pools:
    - name: chat                      # the value the route sets in x-epp-pool
      default: true                   # optional: serves requests that name no pool
      endpoints: [10.0.0.1:8000, 10.0.0.2:8000]    # or endpointsFile: /path.yaml, or
      # inferencePool: {name: chat-pool, namespace: llm}
      configName: epp-default         # or configText: | ..., or configFile: /path.yaml (reloaded); EPP's default
    - name: batch
      endpoints: [10.0.0.3:8000]
      configText: |
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from epp.api.errors import EppError
from epp.config import Config
from epp.extproc.protocol import LB_NAMESPACE, metadata_value

POOL_HEADER = "x-epp-pool"  # set by the gateway's route, after the client's copy was stripped
POOL_NAMESPACE, POOL_KEY = "epp", "pool"  # route metadata (dynamic, set per route), forwarded to ext_proc
_POOL_METADATA = ((POOL_NAMESPACE, POOL_KEY), (LB_NAMESPACE, POOL_HEADER))  # in this order
UNKNOWN_POOL = "unknown-pool"  # the refusal's reason; recorded by the first pool's decision log, in no pool
_FIELDS = {"name", "default", "endpoints", "endpointsFile", "inferencePool", "configName", "configText", "configFile"}


@dataclass(frozen=True)
class PoolSpec:
    name: str
    cfg: Config  # the process's configuration with this pool's endpoint source and scheduling configuration
    default: bool = False


def parse_pools(text: str, base: Config) -> list[PoolSpec]:
    doc = yaml.safe_load(text) or {}
    items = doc.get("pools") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items:
        raise ValueError("pools file: expected a non-empty list under 'pools'")
    specs: list[PoolSpec] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ValueError(f"pools file: each pool needs a name, got {item!r}")
        name = item["name"].strip()
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            raise ValueError(f"pool {name!r}: unknown field(s) {unknown} (allowed: {sorted(_FIELDS)})")
        endpoints = item.get("endpoints")
        if isinstance(endpoints, list):
            endpoints = ",".join(str(e) for e in endpoints)
        ip = item.get("inferencePool") or {}
        if not isinstance(ip, dict):
            raise ValueError(f"pool {name!r}: inferencePool must be a mapping (name, namespace)")
        cfg = dataclasses.replace(
            base, pools_file="", static_endpoints=endpoints or "", static_endpoints_file=item.get("endpointsFile", ""),
            pool_name=ip.get("name", ""), pool_namespace=ip.get("namespace", base.pool_namespace),
            config_name=item.get("configName", ""), config_text=item.get("configText", ""),
            config_file=item.get("configFile", ""))
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"pool {name!r}: {e}") from None
        specs.append(PoolSpec(name, cfg, bool(item.get("default", False))))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"pools file: duplicate pool names in {names}")
    if sum(s.default for s in specs) > 1:
        raise ValueError("pools file: at most one pool may be the default")
    return specs


def metadata_pool(ctx: object) -> str | None:
    """The pool the route named in ext_proc's ``metadata_context``, if any."""
    for namespace, key in _POOL_METADATA:
        value = metadata_value(ctx, namespace, key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


class PoolSelector:
    """The Director of a request's pool, from the route's metadata or the gateway-set header."""

    def __init__(self, directors: Mapping[str, Any], default: str | None) -> None:
        self.directors = dict(directors)
        self.default = default

    def select(self, headers: Mapping[str, str], routed: str | None = None) -> Any:
        """``routed``: the pool named by route metadata (``metadata_pool``)."""
        name = routed or (headers.get(POOL_HEADER) or "").strip() or self.default
        director = self.directors.get(name) if name else None
        if director is None:
            raise EppError(400, UNKNOWN_POOL, "the request's route names no pool this EPP serves"
                           if name else "the request's route names no pool (metadata epp.pool or header x-epp-pool) "
                           "and no pool is the default")
        return director
