"""One typed configuration for the whole process, filled by the CLI flags (GIE names) or by tests."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go-style duration (``50ms``, ``2s``, ``1m30s``) or plain seconds, to seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r} (examples: 50ms, 2s, 1m30s)")
    return total


def parse_bool(text: str | bool) -> bool:
    """Go's strconv.ParseBool, as GIE users write booleans (``--secure-serving=false``)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"invalid boolean {text!r}")


# Under --workers, Envoy's few multiplexed connections must become many for the supervisor to spread them: at most
# this many streams per connection (Envoy's pool opens another when all are full; smaller is a finer spread, more
# connections), and connections renewed this often (+-10%), so a restarted worker gets its share back.
WORKER_MAX_CONCURRENT_STREAMS = 4
WORKER_MAX_CONNECTION_AGE = 300.0


@dataclass
class Config:
    # serving
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    grpc_health_port: int = 9003
    metrics_port: int = 9090
    secure_serving: bool = True
    cert_path: str = ""
    enable_cert_reload: bool = False
    client_ca_path: str = ""  # mutual TLS on ext_proc: clients need a certificate this CA (file or dir/ca.crt) signed
    grpc_max_recv_msg_size: int = 64 << 20
    drain_timeout: float = 30.0
    drain_quiet_period: float = 0.0  # > 0: end the drain early once no stream was open for this long
    workers: int = 1  # processes serving the ext_proc port under a supervisor that places connections (epp.workers)
    worker_index: int = -1  # set by the supervisor on its workers' command lines
    # Per ext_proc connection (epp.extproc.h2grpc): streams at once, advertised in SETTINGS, and seconds until a
    # graceful GOAWAY; 0 is no limit, -1 the default: none with one process, WORKER_* under --workers.
    grpc_max_concurrent_streams: int = -1
    grpc_max_connection_age: float = -1.0
    # discovery
    pool_name: str = ""
    pool_namespace: str = ""
    pool_group: str = "inference.networking.k8s.io"
    endpoint_selector: str = ""
    endpoint_target_ports: list[int] = field(default_factory=list)
    static_endpoints: str = ""
    static_endpoints_file: str = ""
    pools_file: str = ""  # several pools in one EPP (epp.pools): each its endpoints and scheduling configuration
    disable_endpoint_subset_filter: bool = False
    ha_enable_leader_election: bool = False
    # shared routing state for active-active replicas and --workers (epp.state): Valkey/Redis
    state_store_url: str = ""  # redis://host:6379/0 or rediss://...; empty: each replica routes on its own
    state_store_password_file: str = ""  # else $EPP_STATE_STORE_PASSWORD
    state_store_namespace: str = "epp"  # key prefix (the pool's name follows)
    state_store_sync_interval: float = 0.05  # batching period: how stale the others' picks and load may be
    state_store_max_staleness: float = 2.0  # no sync for this long: route on local state only
    state_store_timeout: float = 0.25  # one round trip to the store
    # scheduling
    config_file: str = ""
    config_text: str = ""
    config_name: str = ""  # a built-in configuration: epp-default (the default), gie-default
    refresh_metrics_interval: float = 0.05
    metrics_staleness_threshold: float = 2.0
    # request limits
    max_request_body_bytes: int = 32 << 20
    max_json_depth: int = 64
    max_request_messages: int = 100_000  # 0: no limit (these three: see StreamOptions)
    max_prompt_chars: int = 16 << 20
    max_prompt_tokens: int = 4 << 20
    max_request_body_chunks: int = 16_384  # body messages of one request (Envoy sends 16-64 KiB pieces)
    max_buffered_body_bytes: int = 1 << 30  # request bodies held at once across all streams (0: no limit)
    # trust: headers a client could send to pick its own upstream model or priority are read only when the
    # gateway sets them (and strips clients' copies: see manifests/gateways)
    trust_model_rewrite_header: bool = False
    trust_objective_header: bool = False
    # objective name -> priority without Kubernetes (--static-objectives); InferenceObjectives replace it
    static_objectives: dict[str, int] = field(default_factory=dict)
    wake_timeout: float = 60.0  # a sleeping model server EPP wakes for a request must serve within this, else 503
    sleep_idle_time: float = 0.0  # an endpoint with no request for this long is put to sleep (0: never)
    sleep_level: int = 1  # vLLM's POST /sleep?level=: 1 offloads weights to CPU RAM, 2 discards them
    accelerator_budget: float = 0.0  # models awake at once per accelerator (epp.admission.accelerator); 0: no limit
    # /<deployment>/ path prefix -> served model (epp.admission.models); served names are prefixes without one
    model_deployments: dict[str, str] = field(default_factory=dict)
    # observability
    decision_header: bool = False
    verbosity: int = 2
    log_format: str = "text"
    event_loop: str = "uvloop"  # uvloop | asyncio (--event-loop); see bench/README.md section 2
    tracing: bool | None = None  # None: on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set
    explain_decisions: bool = False  # explain every decision (metadata + x-epp-decision response header)
    explain_token: str = ""  # x-epp-explain: <token> asks for one request's explanation (or EPP_EXPLAIN_TOKEN)
    debug_endpoints: bool = False  # /debug, /debug/endpoints, /debug/decisions on the metrics port
    record_trace: str = ""  # append every routed request (prompts included) to this file, for epp replay
    record_trace_max_bytes: int = 1 << 30  # then stop recording

    @property
    def extproc_connection_limits(self) -> tuple[int, float]:
        """(streams per connection, connection age in seconds) in force, 0 for none: the flags, or their defaults."""
        workers = self.workers > 1 or self.worker_index >= 0
        streams, age = self.grpc_max_concurrent_streams, self.grpc_max_connection_age
        if streams < 0:
            streams = WORKER_MAX_CONCURRENT_STREAMS if workers else 0
        if age < 0:
            age = WORKER_MAX_CONNECTION_AGE if workers else 0.0
        return streams, age

    def validate(self) -> None:
        sources = [bool(self.pool_name), bool(self.endpoint_selector), bool(self.static_endpoints),
                   bool(self.static_endpoints_file), bool(self.pools_file)]
        if sum(sources) != 1:
            raise ValueError("exactly one endpoint source is required: --pool-name, --endpoint-selector, "
                             "--static-endpoints, --static-endpoints-file or --pools-file")
        if sum(map(bool, (self.config_file, self.config_text, self.config_name))) > 1:
            raise ValueError("--config-file, --config-text and --config-name are mutually exclusive")
        if self.refresh_metrics_interval < 0.01:
            raise ValueError("--refresh-metrics-interval must be at least 10ms")
        if self.log_format not in ("text", "json"):
            raise ValueError("--log-format must be text or json")
        if self.wake_timeout <= 0:
            raise ValueError("--wake-timeout must be positive")
        if self.sleep_idle_time < 0 or self.accelerator_budget < 0:
            raise ValueError("--sleep-idle-time and --accelerator-budget must not be negative")
        if self.sleep_level not in (1, 2):
            raise ValueError("--sleep-level must be 1 or 2")
        if self.drain_timeout < 0 or self.drain_quiet_period < 0:
            raise ValueError("--drain-timeout and --drain-quiet-period must not be negative")
        if self.enable_cert_reload and not self.cert_path:
            raise ValueError("--enable-cert-reload needs --cert-path")
        if self.client_ca_path and not self.secure_serving:
            raise ValueError("--client-ca-path needs --secure-serving")
        if self.static_objectives and (self.pool_name or self.endpoint_selector):
            raise ValueError("--static-objectives is for static endpoints; on Kubernetes use InferenceObjectives")
        if not 1 <= self.workers <= 256:
            raise ValueError("--workers must be between 1 and 256")
        if self.grpc_max_concurrent_streams < -1 or self.grpc_max_connection_age < -1:
            raise ValueError("--grpc-max-concurrent-streams and --grpc-max-connection-age must be 0 (none), "
                             "positive, or -1 (the default)")
        if self.state_store_sync_interval < 0.005 or self.state_store_timeout <= 0:
            raise ValueError("--state-store-sync-interval must be at least 5ms and --state-store-timeout positive")
        if self.state_store_max_staleness < self.state_store_sync_interval:
            raise ValueError("--state-store-max-staleness must be at least --state-store-sync-interval")
        if self.endpoint_selector and not self.endpoint_target_ports:
            raise ValueError("--endpoint-selector needs --endpoint-target-ports")
