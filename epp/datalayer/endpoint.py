"""An endpoint (one model-server rank) and what EPP knows about it."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.clock import monotonic

WAKE_GRACE = 2.0  # seconds an endpoint EPP woke counts as awake whatever scrapes say


@dataclass(slots=True)
class EndpointMetrics:
    """The model server's own view, as last scraped. ``updated_at`` is time.monotonic(); 0 = never."""

    waiting_requests: int = 0
    running_requests: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    active_models: frozenset[str] = frozenset()  # LoRA adapters loaded and running
    waiting_models: frozenset[str] = frozenset()
    max_active_models: int = 0
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    updated_at: float = 0.0
    last_error: str | None = None
    inflight_tokens_at_scrape: int = 0  # Endpoint.inflight_tokens when these values were scraped
    inflight_requests_at_scrape: int = 0  # Endpoint.inflight_requests when these values were scraped
    unreachable: bool = False  # the server stopped answering scrapes (see datalayer.scraper.UNREACHABLE_AFTER)
    sleeping: bool = False  # the engine reports it sleeps (vLLM sleep mode): not a routing candidate until woken
    woken_at: float = 0.0  # time.monotonic() when EPP last woke it (see Endpoint.asleep)
    slept_at: float = 0.0  # time.monotonic() when EPP last put it to sleep (see Endpoint.asleep)
    served_model: str = ""  # the model the server serves, from its metrics' labels ("" until scraped)

    def age(self, now: float | None = None) -> float:
        """Seconds since the last successful scrape (infinite when never scraped)."""
        if not self.updated_at:
            return float("inf")
        return (monotonic() if now is None else now) - self.updated_at


@dataclass(eq=False, slots=True)
class Endpoint:
    """Identity is the object: the pool replaces an endpoint object when its address changes.

    ``inflight_*`` are EPP's first-hand counts (incremented on pick, decremented when the response
    ends or the stream dies), which react faster than scraped metrics; with a shared store they include
    the other replicas' (``remote_*``).
    """

    name: str
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    metrics: EndpointMetrics = field(default_factory=EndpointMetrics)
    metrics_port: int | None = None
    kv_events: str | None = None  # ZMQ address of its KV-event publisher, when the endpoints file names one
    kv_events_replay: str | None = None  # ... and of the publisher's replay socket
    annotations: dict[str, str] = field(default_factory=dict)  # its pod's (Kubernetes discovery)
    inflight_requests: int = 0
    inflight_tokens: int = 0
    # Of the in-flight counts, what other replicas routed there (epp.state: a shared store folds it in)
    remote_requests: int = 0
    remote_tokens: int = 0
    namespace: str = ""  # its pod's (Kubernetes discovery); "" for static endpoints
    rank: int = 0  # its port's index in the pool's target ports: vLLM offsets a DP rank's KV-event port by it

    def waiting_now(self) -> int:
        """Waiting requests as scraped, moved by the requests EPP routed there (or saw end) since: each one
        routed since the scrape is counted as waiting (free batch slots are not known), each one ended frees a
        slot for a waiting request."""
        m = self.metrics
        return max(0, m.waiting_requests + self.inflight_requests - m.inflight_requests_at_scrape)

    def kv_usage_now(self) -> float:
        """KV-cache usage as scraped, moved by the tokens EPP routed there (or saw finish) since: a scrape is
        up to an interval old, and every pick made on it alone would land on the same endpoint. The scraped
        value when the KV capacity (``cache_config_info``) is unknown."""
        m = self.metrics
        usage = m.kv_cache_usage
        if m.num_gpu_blocks and m.block_size:
            usage += (self.inflight_tokens - m.inflight_tokens_at_scrape) / (m.num_gpu_blocks * m.block_size)
        return min(1.0, max(0.0, usage))

    @property
    def asleep(self) -> bool:
        """The engine sleeps, as last scraped; within ``WAKE_GRACE`` s of EPP waking it or putting it to sleep,
        as EPP left it (a scrape that began before may still report the old state)."""
        m = self.metrics
        now = monotonic()
        return (m.slept_at > 0 and now - m.slept_at <= WAKE_GRACE) or (m.sleeping and now - m.woken_at > WAKE_GRACE)

    @property
    def hostport(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def metrics_url_base(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.metrics_port or self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.name}, {self.hostport})"
