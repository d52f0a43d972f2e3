"""A whole local stack on loopback: simulated vLLM pods, EPP and a real Envoy, each its own process.

Used by the demo (``make demo``), the end-to-end tests and the benchmarks. Every process is stopped
on ``stop()`` / context exit, and however the rig itself ends (``epp.stack.procs``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.stack import procs
from epp.stack.envoy import EnvoyProcess, EnvoySpec

HOST = "127.0.0.1"


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


# Ports are picked below the kernel's ephemeral range: outgoing connections (Envoy to the pods, clients)
# take their source ports from that range and could grab a port between our pick and the server's bind
# (seen as "Address already in use" when EPP restarts). Ports handed out are not handed out twice.
_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()


def free_port() -> int:
    return free_port_range(1)


def free_port_range(n: int, start: int = 20000, stop: int | None = None) -> int:
    """First port of ``n`` consecutive free ports (the simulator serves pods on consecutive ports)."""
    if stop is None:
        stop = _EPHEMERAL_LOW if _EPHEMERAL_LOW - start > 2000 else 60000
    rng = __import__("random").Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(start, stop - n)
        if _handed_out.intersection(range(base, base + n)):
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, base + i))
            _handed_out.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class ManagedProcess:
    """A child process whose output goes to a log file, started and waited for readiness."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = procs.spawn(self.argv, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for_log(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if needle in line:
                    return line
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        returncode = procs.stop(self.proc, timeout) if self.proc is not None else None
        with contextlib.suppress(AttributeError):
            self._log.close()
        return returncode


def wait_grpc_serving(port: int, timeout: float = 20.0, service: str = "") -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"{HOST}:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"gRPC health on {port} not SERVING after {timeout}s")


@dataclass
class LocalStack:
    pods: int = 3
    sim_args: list[str] = field(default_factory=lambda: ["--profile", "fast"])
    epp_args: list[str] = field(default_factory=list)
    upstream: str = EnvoySpec.upstream
    response_body_mode: str = EnvoySpec.response_body_mode
    envoy_profile: str = EnvoySpec.profile  # "gie": GIE's standard Envoy configuration as it ships (EnvoySpec.profile)
    failure_mode_allow: bool = False
    tls: bool = True
    baseline: bool = False
    envoy_log_level: str = "warning"
    # Model servers already running elsewhere (e.g. pods shared by several stacks in a benchmark):
    # start() then runs only EPP and Envoy in front of them.
    sim_endpoints: list[str] | None = None
    route_timeout: float = EnvoySpec.route_timeout  # bounds a request to a hung model server
    # Envoy verifies EPP against ca.crt in this directory (and presents its tls.crt / tls.key with
    # envoy_client_cert); see EnvoySpec. EPP's own certificate comes from epp_args (--cert-path).
    extproc_tls_dir: str | None = None
    extproc_san: str = EnvoySpec.extproc_san
    envoy_client_cert: bool = False
    route_headers: dict[str, dict[str, str]] = field(default_factory=dict)  # gateway policies, see EnvoySpec
    route_metadata: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # see EnvoySpec

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epp-stack-"))
        if self.sim_endpoints is not None:
            self.endpoints = list(self.sim_endpoints)
            self.pods = len(self.endpoints)
        else:
            self.sim_base = free_port_range(self.pods)
            self.endpoints = [f"{HOST}:{self.sim_base + i}" for i in range(self.pods)]
        self.grpc_port, self.health_port, self.metrics_port = free_port(), free_port(), free_port()
        self.envoy_port, self.admin_port = free_port(), free_port()
        self.baseline_port = free_port() if self.baseline else None
        self.sim: ManagedProcess | None = None
        self.epp: ManagedProcess | None = None
        self.envoy: EnvoyProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.envoy_port}"

    def start_sim(self) -> None:
        self.sim = ManagedProcess("sim", [sys.executable, "-m", "epp_sim", "--pods", str(self.pods), "--host", HOST,
                                          "--base-port", str(self.sim_base), *self.sim_args], self.dir)
        self.sim.start()
        self.sim.wait_for_log("sim ready", 30)

    def epp_argv(self) -> list[str]:
        return [sys.executable, "-m", "epp", "--host", HOST, "--grpc-port", str(self.grpc_port),
                "--grpc-health-port", str(self.health_port), "--metrics-port", str(self.metrics_port),
                f"--secure-serving={str(self.tls).lower()}", "--decision-header",
                "--debug-endpoints",  # loopback-only rig: the tests and the demo read /debug
                *(() if any(a.startswith(("--static-endpoints", "--pool-name", "--endpoint-selector", "--pools-file"))
                            for a in self.epp_args)
                  else ("--static-endpoints", ",".join(self.endpoints))),
                "--drain-timeout=0s",  # teardown SIGTERMs EPP: exit at once (a test wanting a drain passes its own)
                *self.epp_args]

    def start_epp(self) -> None:
        self.epp = ManagedProcess("epp", self.epp_argv(), self.dir)
        self.epp.start()
        try:
            wait_grpc_serving(self.health_port, 30)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; EPP log:\n{self.epp.tail()}") from None

    def start_envoy(self, wait_healthy: bool = True) -> None:
        self.envoy = EnvoyProcess(EnvoySpec(
            listen_port=self.envoy_port, admin_port=self.admin_port, extproc_port=self.grpc_port,
            endpoints=self.endpoints, upstream=self.upstream, response_body_mode=self.response_body_mode,
            profile=self.envoy_profile,
            failure_mode_allow=self.failure_mode_allow, extproc_tls=self.tls, baseline_port=self.baseline_port,
            access_log=str(self.dir / "access.log"), route_timeout=self.route_timeout,
            extproc_tls_dir=self.extproc_tls_dir, extproc_san=self.extproc_san,
            extproc_client_cert=self.envoy_client_cert, route_headers=self.route_headers,
            route_metadata=self.route_metadata),
            log_level=self.envoy_log_level)
        self.envoy.start()
        if wait_healthy:
            self.envoy.wait_extproc_healthy()

    def kill_epp(self, sig: int = signal.SIGKILL) -> None:
        """Stop EPP abruptly (SIGKILL: a crash) or by ``sig``; Envoy and the pods keep running."""
        if self.epp is not None and self.epp.proc is not None:
            if self.epp.alive():
                self.epp.proc.send_signal(sig)
                try:
                    self.epp.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.epp.proc.kill()
            self.epp.stop()

    def restart_epp(self, wait_envoy: bool = True) -> None:
        """Start EPP again on the same ports (killing it first if it still runs); by default also wait
        until Envoy's health check has seen it healthy, i.e. until picks resume."""
        self.kill_epp()
        self.start_epp()
        if wait_envoy and self.envoy is not None:
            self.envoy.wait_extproc_healthy(30)

    @property
    def epp_pid(self) -> int | None:
        return self.epp.proc.pid if self.epp is not None and self.epp.proc is not None else None

    def start(self) -> LocalStack:
        try:
            if self.sim_endpoints is None:
                self.start_sim()
            self.start_epp()
            self.start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.envoy:
            self.envoy.stop()
        for proc in (self.epp, self.sim):
            if proc:
                proc.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
