"""Static discovery: endpoints from a flag or a YAML file (reloaded when it changes).

File format::

    endpoints:
    - 10.0.0.1:8000                      # shorthand
    - address: 10.0.0.2
      port: 8000
      name: vllm-b                       # optional, defaults to address:port
      labels: {gpu: h100}                # optional, for label-selector-filter
      metricsPort: 8001                  # optional, defaults to port
      kvEventsPort: 5557                 # optional: its vLLM KV-event publisher (or kvEventsEndpoint: tcp://...),
      kvEventsReplayPort: 5558           #   and replay socket (or kvEventsReplayEndpoint), for precise prefix routing
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.reload import FileWatcher

log = logging.getLogger(__name__)


class DiscoveryError(ValueError):
    pass


def parse_hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        host, _, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise DiscoveryError(f"endpoint {text!r}: expected host:port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host or any(c.isspace() for c in host):
            raise DiscoveryError(f"endpoint {text!r}: bad host") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise DiscoveryError(f"endpoint {text!r}: bad port")
    return host, int(port)


def _spec(item: Any) -> EndpointSpec:
    if isinstance(item, str):
        host, port = parse_hostport(item)
        return EndpointSpec(f"{host}:{port}", host, port)
    if not isinstance(item, dict):
        raise DiscoveryError(f"endpoint entry must be 'host:port' or a mapping, got {item!r}")
    unknown = set(item) - {"address", "port", "name", "labels", "metricsPort", *_KV_EVENT_FIELDS}
    if unknown:
        raise DiscoveryError(f"endpoint entry {item!r}: unknown field(s) {sorted(unknown)}")
    try:
        host, port = parse_hostport(f"{item['address']}:{item['port']}")
    except KeyError as e:
        raise DiscoveryError(f"endpoint entry {item!r}: missing {e.args[0]!r}") from None
    labels = item.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) for k in labels):
        raise DiscoveryError(f"endpoint entry {item!r}: labels must be a mapping of strings")
    return EndpointSpec(str(item.get("name") or f"{host}:{port}"), host, port,
                        {k: str(v) for k, v in labels.items()}, item.get("metricsPort"), *_kv_events(item, host))


_KV_EVENT_FIELDS = ("kvEventsPort", "kvEventsEndpoint", "kvEventsReplayPort", "kvEventsReplayEndpoint")


def _kv_events(item: dict[str, Any], host: str) -> tuple[str | None, str | None]:
    """The endpoint's KV-event publisher and replay socket: a full ZMQ address, or a port on its host."""
    zhost = f"[{host}]" if ":" in host else host
    out: list[str | None] = []
    for port_key, address_key in (("kvEventsPort", "kvEventsEndpoint"),
                                  ("kvEventsReplayPort", "kvEventsReplayEndpoint")):
        address, port = item.get(address_key), item.get(port_key)
        if address is not None and not isinstance(address, str):
            raise DiscoveryError(f"endpoint entry {item!r}: {address_key} must be a string like tcp://host:5557")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise DiscoveryError(f"endpoint entry {item!r}: {port_key} must be a port number")
        out.append(address or (f"tcp://{zhost}:{port}" if port else None))
    return out[0], out[1]


def parse_endpoint_list(text: str) -> list[EndpointSpec]:
    """``host:port,host:port`` as given to ``--static-endpoints``."""
    return _unique([_spec(part) for part in text.split(",") if part.strip()])


def parse_endpoints_file(text: str) -> list[EndpointSpec]:
    doc = yaml.safe_load(text) or {}
    items = doc.get("endpoints") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise DiscoveryError("static endpoints file: expected a list under 'endpoints'")
    return _unique([_spec(item) for item in items])


def _unique(specs: list[EndpointSpec]) -> list[EndpointSpec]:
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise DiscoveryError(f"duplicate endpoint name(s): {sorted(dupes)}")
    return specs


class StaticFileDiscovery:
    """Keeps ``pool`` equal to the file; an invalid edit is logged and the old view kept."""

    def __init__(self, pool: EndpointPool, path: str | os.PathLike[str], poll_interval: float = 1.0) -> None:
        self.pool = pool
        self.watcher = FileWatcher(path, self._apply, poll_interval, name="static endpoints file")
        self._applied = False

    @property
    def path(self) -> Path:
        return self.watcher.path

    def _apply(self, text: str) -> None:
        try:
            specs = parse_endpoints_file(text)
        except (DiscoveryError, yaml.YAMLError) as e:
            log.error("static endpoints file %s rejected, keeping previous endpoints: %s", self.path, e)
            self._applied = False
            return
        self.pool.sync(specs)
        self._applied = True

    def load(self) -> bool:
        """Read the file if it changed; True when the pool was updated."""
        return self.watcher.check() and self._applied

    async def start(self) -> None:
        if not self.load() and not self.pool.synced:
            raise DiscoveryError(f"static endpoints file {self.path} could not be loaded")
        await self.watcher.start()

    def is_leader(self) -> bool:
        return True

    async def stop(self) -> None:
        await self.watcher.stop()
