"""Command line: GIE's flag names and defaults, plus static endpoints for a standalone Envoy."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from epp.config import WORKER_MAX_CONCURRENT_STREAMS, WORKER_MAX_CONNECTION_AGE, Config, parse_bool, parse_duration
from epp.scheduling.config import BUILTIN_CONFIGS


def _ports(text: str) -> list[int]:
    ports = sorted({int(p) for p in text.split(",") if p.strip()})
    if not 1 <= len(ports) <= 8 or not all(0 < p < 65536 for p in ports):
        raise ValueError("1 to 8 ports between 1 and 65535")
    return ports


def _typed(fn, name: str):  # argparse shows the function name in errors
    fn.__name__ = name
    return fn


def _objectives(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, priority = part.partition("=")
        if not sep or not name.strip():
            raise ValueError("name=priority,...")
        out[name.strip()] = int(priority)
    return out


def _deployments(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, model = (x.strip() for x in part.partition("="))
        if not sep or not name or not model or "/" in name:
            raise ValueError("deployment=served-model,... (a deployment name has no '/')")
        out[name] = model
    return out


_bool = _typed(parse_bool, "boolean")
_duration = _typed(parse_duration, "duration")


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    ap = argparse.ArgumentParser(prog="epp", description="Envoy ext_proc endpoint picker for LLM inference.",
                                 epilog="subcommand: 'epp replay TRACE --config-name A --config-name B' replays a "
                                        "recorded trace (--record-trace) against simulated pods in virtual time "
                                        "to compare configurations ('epp replay --help')")

    def flag(*names: str, **kw) -> None:
        if kw.get("type") is _bool:  # Go style: --flag, --flag=true, --flag=false
            kw.setdefault("nargs", "?")
            kw.setdefault("const", True)
        ap.add_argument(*names, **kw)

    flag("--host", default=d.host, help="bind address for all listeners (default %(default)s)")
    flag("--grpc-port", type=int, default=d.grpc_port, help="ext_proc gRPC port (default %(default)s)")
    flag("--grpc-health-port", type=int, default=d.grpc_health_port, help="gRPC health port")
    flag("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port")
    flag("--secure-serving", type=_bool, default=d.secure_serving, help="TLS on the ext_proc port")
    flag("--cert-path", default=d.cert_path, help="directory with tls.crt and tls.key (self-signed if empty)")
    flag("--enable-cert-reload", type=_bool, default=d.enable_cert_reload, help="reload the certificate on change")
    flag("--client-ca-path", default=d.client_ca_path,
         help="mutual TLS on the ext_proc port: require client certificates signed by this CA (a PEM file, or a "
              "directory with ca.crt); reloaded with the certificate under --enable-cert-reload")
    flag("--grpc-max-recv-msg-size", type=int, default=d.grpc_max_recv_msg_size)
    flag("--drain-timeout", type=_duration, default=d.drain_timeout,
         help="after SIGTERM: report NOT_SERVING but keep serving (new streams too) this long, then exit")
    flag("--drain-quiet-period", type=_duration, default=d.drain_quiet_period,
         help="end the drain early once no stream has been open for this long and a health probe was told "
              "NOT_SERVING (0: serve the whole --drain-timeout, as GIE)")

    flag("--workers", type=int, default=d.workers,
         help="processes serving the ext_proc port under one supervisor, which accepts its connections and hands "
              "each to the least loaded worker, aggregates health, /metrics (a worker label) and /debug and passes "
              "drain and reload on; share routing state between them with --state-store-url")
    flag("--worker-index", type=int, default=d.worker_index, help=argparse.SUPPRESS)
    flag("--grpc-max-concurrent-streams", type=int, default=d.grpc_max_concurrent_streams,
         help="ext_proc streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS; Envoy opens another "
              f"connection past it); 0: no limit; default: {WORKER_MAX_CONCURRENT_STREAMS} with --workers, else none")
    flag("--grpc-max-connection-age", type=_duration, default=d.grpc_max_connection_age,
         help="tell an ext_proc connection to go away (graceful GOAWAY: streams in flight finish) after this long, "
              f"+-10%%; 0: never; default: {WORKER_MAX_CONNECTION_AGE:g}s with --workers, else never")

    flag("--pool-name", default=d.pool_name, help="InferencePool to watch")
    flag("--pool-namespace", default=d.pool_namespace)
    flag("--pool-group", default=d.pool_group)
    flag("--endpoint-selector", default=d.endpoint_selector, help="standalone pod selector k=v,...")
    flag("--endpoint-target-ports", type=_ports, default=d.endpoint_target_ports)
    flag("--static-endpoints", default=d.static_endpoints, help="host:port,host:port (no Kubernetes)")
    flag("--static-endpoints-file", default=d.static_endpoints_file, help="YAML endpoint list, reloaded on change")
    flag("--pools-file", default=d.pools_file,
         help="several pools in one EPP: a YAML list of pools, each with its endpoints (or InferencePool) and "
              "scheduling configuration; the gateway's route names a request's pool in x-epp-pool (see epp/pools.py)")
    flag("--disable-endpoint-subset-filter", type=_bool, default=d.disable_endpoint_subset_filter)
    flag("--ha-enable-leader-election", type=_bool, default=d.ha_enable_leader_election,
         help="active-passive replicas: only the holder of a Lease reports ready")

    flag("--state-store-url", default=d.state_store_url,
         help="active-active replicas and --workers: share the prefix index and in-flight load through this "
              "Valkey/Redis (redis://host:6379/0, rediss:// for TLS); empty: each process routes on its own state")
    flag("--state-store-password-file", default=d.state_store_password_file,
         help="file holding the store's password (a mounted Secret); default $EPP_STATE_STORE_PASSWORD")
    flag("--state-store-namespace", default=d.state_store_namespace, help="key prefix in the store")
    flag("--state-store-sync-interval", type=_duration, default=d.state_store_sync_interval,
         help="how often picks and load are exchanged (one pipelined round trip; bounds staleness)")
    flag("--state-store-max-staleness", type=_duration, default=d.state_store_max_staleness,
         help="with no successful sync for this long, other replicas' load is dropped: local state only")
    flag("--state-store-timeout", type=_duration, default=d.state_store_timeout,
         help="longest wait for one round trip to the store (the request path never waits on it)")

    flag("--config-file", default=d.config_file, help="EndpointPickerConfig YAML file")
    flag("--config-name", default=d.config_name, choices=["", *BUILTIN_CONFIGS],
         help="a built-in EndpointPickerConfig: epp-default (used when no config is given), gie-default "
              "(GIE's: queue x2, kv-cache x2, prefix x3)")
    flag("--config-text", default=d.config_text, help="EndpointPickerConfig YAML text")
    flag("--refresh-metrics-interval", type=_duration, default=d.refresh_metrics_interval)
    flag("--metrics-staleness-threshold", type=_duration, default=d.metrics_staleness_threshold)

    flag("--max-request-body-bytes", type=int, default=d.max_request_body_bytes)
    flag("--max-json-depth", type=int, default=d.max_json_depth)
    flag("--max-request-messages", type=int, default=d.max_request_messages,
         help="most chat/Anthropic messages or Responses input items in one request (0: no limit)")
    flag("--max-prompt-chars", type=int, default=d.max_prompt_chars,
         help="longest prompt text, in characters (0: no limit)")
    flag("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
         help="longest prompt sent as token ids (0: no limit)")
    flag("--max-request-body-chunks", type=int, default=d.max_request_body_chunks,
         help="most body messages in one request's ext_proc stream (0: no limit)")
    flag("--max-buffered-body-bytes", type=int, default=d.max_buffered_body_bytes,
         help="request-body bytes held at once across all streams; past it new bodies get 503 (0: no limit)")
    flag("--trust-model-rewrite-header", type=_bool, default=d.trust_model_rewrite_header,
         help="honour x-gateway-model-name-rewrite / x-llm-d-model-name-rewrite (set them in the gateway, "
              "which must strip clients' copies)")
    flag("--trust-objective-header", type=_bool, default=d.trust_objective_header,
         help="honour x-gateway-inference-objective / x-llm-d-inference-objective (gateway-set, as above)")

    flag("--static-objectives", type=_typed(_objectives, "objectives"), default=d.static_objectives,
         help="objective name -> priority without Kubernetes, e.g. interactive=10,batch=-1 (priority < 0: "
              "sheddable); the objective comes from x-gateway-inference-objective (--trust-objective-header)")

    flag("--wake-timeout", type=_duration, default=d.wake_timeout,
         help="a request whose endpoints all sleep (vLLM sleep mode) wakes one and waits this long for it, "
              "then gets 503 wake-failed")
    flag("--sleep-idle-time", type=_duration, default=d.sleep_idle_time,
         help="put an endpoint to sleep (vLLM sleep mode) once no request went to it for this long, behind a drain "
              "barrier (0: never)")
    flag("--sleep-level", type=int, default=d.sleep_level, choices=[1, 2],
         help="the level EPP puts endpoints to sleep at: 1 offloads weights to CPU RAM, 2 discards them")
    flag("--accelerator-budget", type=float, default=d.accelerator_budget,
         help="models awake at once on one accelerator (or memory, with the epp.io/accelerator-memory label), unless "
              "the epp.io/accelerator-budget label says; waking one more puts the least-recently-used to sleep "
              "(0: no limit)")
    flag("--model-deployments", type=_typed(_deployments, "deployments"), default=d.model_deployments,
         help="path prefixes: deployment=served-model,... (http://<gateway>/<deployment>/v1/...); a served model "
              "name is its own prefix")

    flag("-v", "--v", dest="verbosity", type=int, default=d.verbosity, help="log verbosity like GIE: 2 info, 4 debug")
    flag("--decision-header", type=_bool, default=d.decision_header,
         help="add x-epp-endpoint (the picked endpoint) to responses")
    flag("--log-format", default=d.log_format, choices=["text", "json"])
    flag("--event-loop", default=d.event_loop, choices=["uvloop", "asyncio"],
         help="the event loop EPP runs on: uvloop (libuv; ~12%% less CPU per request, ~19%% more requests/s "
              "with response bodies through EPP) or Python's own")
    flag("--tracing", type=_bool, default=d.tracing,
         help="OpenTelemetry spans over OTLP (default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set)")
    flag("--explain-decisions", type=_bool, default=d.explain_decisions,
         help="explain every decision: scores in envoy.lb metadata and the x-epp-decision response header")
    flag("--explain-token", default=d.explain_token,
         help="requests with 'x-epp-explain: <token>' get their decision explained (env EPP_EXPLAIN_TOKEN)")
    flag("--debug-endpoints", type=_bool, default=d.debug_endpoints,
         help="serve /debug (live page), /debug/endpoints and /debug/decisions on the metrics port "
              "(off by default: they show request paths and endpoint state to whoever reaches the port)")
    flag("--record-trace", default=d.record_trace,
         help="append every request that reaches routing (arrival time, path, headers but credentials, body: "
              "prompts included) to this JSON-lines file, for 'epp replay' (with --workers, one file per worker)")
    flag("--record-trace-max-bytes", type=int, default=d.record_trace_max_bytes,
         help="stop recording once the trace holds this many bytes")
    return ap


def parse_args(argv: Sequence[str] | None = None) -> Config:
    ap = build_parser()
    ns = ap.parse_args(argv)
    cfg = Config(**{k: v for k, v in vars(ns).items()})
    try:
        cfg.validate()
    except ValueError as e:
        ap.error(str(e))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["replay"]:  # a subcommand; every flag of the server starts with "-"
        from epp.replay import main as replay

        return replay(args[1:])
    from epp.server import run

    cfg = parse_args(argv)
    if cfg.workers > 1:
        from epp.workers import run_supervisor

        return run_supervisor(cfg, sys.argv[1:] if argv is None else argv)
    if cfg.event_loop == "uvloop":
        import uvloop  # libuv's event loop: less overhead per callback on the per-chunk ext_proc path

        uvloop.install()
    try:
        return asyncio.run(run(cfg))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
