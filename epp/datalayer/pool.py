"""The set of endpoints EPP may route to, fed by one discovery source."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from epp.datalayer.endpoint import Endpoint
from epp.datalayer.tokens import TokenRatios

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """What discovery knows about an endpoint: enough to create or update an ``Endpoint``."""

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None
    kv_events: str | None = None  # KV-event publisher (ZMQ address), replay socket
    kv_events_replay: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)  # pod annotations (the accelerator budget)
    namespace: str = ""  # the pod's namespace (Kubernetes discovery)
    rank: int = 0  # index of its port in the pool's target ports


Listener = Callable[[list[Endpoint], list[Endpoint]], None]  # (added, removed)
UpdateListener = Callable[[list[Endpoint]], None]  # endpoints kept whose labels, annotations or ports changed
# (endpoint, last_seen): its server restarted after last_seen, the monotonic time the old process was last scraped
RestartListener = Callable[[Endpoint, float], None]


class EndpointPool:
    """Endpoints by name. Discovery calls ``sync``; the request path reads ``endpoints`` (a tuple
    rebuilt only on change, so readers never copy)."""

    def __init__(self, name: str = "static") -> None:
        self.name = name
        self._by_name: dict[str, Endpoint] = {}
        self._snapshot: tuple[Endpoint, ...] = ()
        self._listeners: list[Listener] = []
        self._update_listeners: list[UpdateListener] = []
        self._restart_listeners: list[RestartListener] = []
        self.synced = False  # set once discovery has delivered a first full view
        self.tokens = TokenRatios()  # characters per token, learned per model from the servers' usage

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._snapshot

    def get(self, name: str) -> Endpoint | None:
        return self._by_name.get(name)

    def add_listener(self, listener: Listener) -> None:
        if listener not in self._listeners:  # a plugin kept across a config reload registers again
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_update_listener(self, listener: UpdateListener) -> None:
        """Called with the endpoints ``sync`` kept (same object) but whose labels, annotations, metrics port or
        KV-event addresses changed, e.g. a relabelled pod."""
        if listener not in self._update_listeners:
            self._update_listeners.append(listener)

    def remove_update_listener(self, listener: UpdateListener) -> None:
        if listener in self._update_listeners:
            self._update_listeners.remove(listener)

    def add_restart_listener(self, listener: RestartListener) -> None:
        """Called when an endpoint's server restarted at the same address (``epp.datalayer.restarts``: seen in its
        metrics), so that what EPP believed it cached can be forgotten. The endpoint stays in the pool."""
        if listener not in self._restart_listeners:
            self._restart_listeners.append(listener)

    def remove_restart_listener(self, listener: RestartListener) -> None:
        if listener in self._restart_listeners:
            self._restart_listeners.remove(listener)

    def restarted(self, endpoint: Endpoint, last_seen: float) -> None:
        """Tell the restart listeners (the scraper calls this on the event loop)."""
        for listener in list(self._restart_listeners):
            try:
                listener(endpoint, last_seen)
            except Exception:  # one plugin's failure must not keep the others believing a dead cache
                log.exception("restart listener %r failed for %s", listener, endpoint.name)

    def sync(self, specs: Iterable[EndpointSpec]) -> None:
        """Make the pool equal to ``specs``. Unchanged endpoints keep their object (and so their
        metrics and in-flight counts); an endpoint whose address changed is replaced."""
        wanted = {s.name: s for s in specs}
        added: list[Endpoint] = []
        removed: list[Endpoint] = []
        changed: list[Endpoint] = []
        for name, ep in list(self._by_name.items()):
            spec = wanted.get(name)
            if spec is None or (spec.address, spec.port) != (ep.address, ep.port):
                removed.append(self._by_name.pop(name))
                continue
            now = (spec.labels, spec.annotations, spec.metrics_port, spec.kv_events, spec.kv_events_replay,
                   spec.namespace, spec.rank)
            if now != (ep.labels, ep.annotations, ep.metrics_port, ep.kv_events, ep.kv_events_replay,
                       ep.namespace, ep.rank):
                ep.labels, ep.annotations = dict(spec.labels), dict(spec.annotations)
                ep.metrics_port = spec.metrics_port
                ep.kv_events, ep.kv_events_replay = spec.kv_events, spec.kv_events_replay
                ep.namespace, ep.rank = spec.namespace, spec.rank
                changed.append(ep)
        for name, spec in wanted.items():
            if name not in self._by_name:
                ep = Endpoint(spec.name, spec.address, spec.port, dict(spec.labels), metrics_port=spec.metrics_port,
                              kv_events=spec.kv_events, kv_events_replay=spec.kv_events_replay,
                              annotations=dict(spec.annotations), namespace=spec.namespace, rank=spec.rank)
                self._by_name[name] = ep
                added.append(ep)
        self.synced = True
        if added or removed:
            self._snapshot = tuple(self._by_name.values())
            log.info("pool %s: %d endpoints (+%d -%d)", self.name, len(self._snapshot), len(added), len(removed))
            for listener in self._listeners:
                listener(added, removed)
        if changed:
            for update in list(self._update_listeners):
                update(changed)
