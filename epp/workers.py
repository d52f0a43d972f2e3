"""``--workers N``: N EPP processes serving one ext_proc port, under a supervisor that speaks for them.

Each worker is a whole EPP (``python -m epp`` with the same flags) that binds the ext_proc port with SO_REUSEPORT,
so the kernel spreads Envoy's connections across them, and its health and metrics ports on ephemeral loopback ports
that it reports to the supervisor through a pipe. Routing state stays coherent across workers through the shared
store (``--state-store-url``, epp.state), as across replicas; without one each worker routes on what it sees.

The supervisor serves what a deployment probes and scrapes, aggregated:

* gRPC health on ``--grpc-health-port``: SERVING when every worker is ready (each polled every ``POLL`` s); the
  ext_proc port's own health is answered by whichever worker Envoy's connection landed on.
* ``/metrics`` on ``--metrics-port``: every worker's page, each sample labelled ``worker="i"`` (sum by pool,
  endpoint, ... in PromQL); ``/debug/...``: each worker's answer under its index.
* SIGTERM drains every worker (each runs its own drain) and waits for them; SIGHUP reaches every worker (config
  reload); a worker that dies unexpectedly is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from epp.config import Config
from epp.health import HealthServicer
from epp.logs import setup_logging

log = logging.getLogger("epp.workers")

FD_ENV = "EPP_WORKER_FD"  # a worker writes its ports, as one JSON line, to this file descriptor
POLL = 0.5  # seconds between readiness polls of each worker
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
_SERVING = health_pb2.HealthCheckResponse.SERVING


def announce(health_port: int, metrics_port: int) -> None:
    """In a worker, once serving: tell the supervisor where its health and metrics are."""
    fd = os.environ.pop(FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "health": health_port, "metrics": metrics_port}) + "\n")


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    health_port: int = 0
    metrics_port: int = 0
    ready: bool = False
    restarts: int = 0
    stub: health_pb2_grpc.HealthStub | None = field(default=None, repr=False)
    channel: grpc.aio.Channel | None = field(default=None, repr=False)


def worker_argv(argv: Sequence[str], index: int) -> list[str]:
    """The worker's command line: the supervisor's flags, then its own (argparse keeps the last of a repeat)."""
    return [sys.executable, "-m", "epp", *argv, "--workers=1", f"--worker-index={index}", "--grpc-health-port=0",
            "--metrics-port=0"]


class Supervisor:
    def __init__(self, cfg: Config, argv: Sequence[str]) -> None:
        self.cfg = cfg
        self.argv = list(argv)
        self.workers = [Worker(i) for i in range(cfg.workers)]
        self.health = HealthServicer(ready=lambda: all(w.ready for w in self.workers))
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host

    # -- workers --------------------------------------------------------------------------------------

    async def _spawn(self, w: Worker) -> None:
        rfd, wfd = os.pipe()
        env = {**os.environ, FD_ENV: str(wfd)}
        # a session of its own: a terminal's Ctrl-C reaches the supervisor, which passes it on once
        w.proc = await asyncio.create_subprocess_exec(*worker_argv(self.argv, w.index), env=env, pass_fds=(wfd,),
                                                      start_new_session=True)
        os.close(wfd)
        loop = asyncio.get_running_loop()
        try:
            line = await loop.run_in_executor(None, _read_line, rfd)
        finally:
            os.close(rfd)
        if not line:
            raise RuntimeError(f"worker {w.index} exited before serving")
        ports = json.loads(line)
        w.health_port, w.metrics_port = ports["health"], ports["metrics"]
        if w.channel is not None:
            await w.channel.close()
        w.channel = grpc.aio.insecure_channel(f"{self.local_host}:{w.health_port}")
        w.stub = health_pb2_grpc.HealthStub(w.channel)
        log.info("worker %d serving (pid %d, health %d, metrics %d)", w.index, w.proc.pid, w.health_port,
                 w.metrics_port)

    async def _watch(self, w: Worker) -> None:
        """Poll the worker's readiness; start it again if it dies while we are not stopping."""
        while True:
            assert w.proc is not None
            if w.proc.returncode is not None:
                w.ready = False
                if self.stopping:
                    return
                log.error("worker %d exited with %s; starting it again", w.index, w.proc.returncode)
                w.restarts += 1
                await asyncio.sleep(RESTART_DELAY)
                try:
                    await self._spawn(w)
                except Exception as e:
                    log.error("worker %d failed to start: %s", w.index, e)
                continue
            try:
                assert w.stub is not None
                r = await w.stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=POLL * 2)
                w.ready = r.status == _SERVING
            except grpc.RpcError:
                w.ready = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(w.proc.wait(), POLL)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    # -- aggregation -----------------------------------------------------------------------------------

    async def _fetch(self, session: aiohttp.ClientSession, w: Worker, path: str) -> tuple[int, str]:
        url = f"http://{self.local_host}:{w.metrics_port}{path}"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as e:
            return 503, f"worker {w.index} did not answer: {e}"

    async def _gather(self, path: str) -> list[tuple[Worker, int, str]]:
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(self._fetch(session, w, path) for w in self.workers))
        return [(w, status, text) for w, (status, text) in zip(self.workers, answers, strict=True)]

    async def metrics(self, _: web.Request) -> web.Response:
        pages = [(w.index, text) for w, status, text in await self._gather("/metrics") if status == 200]
        body = await asyncio.to_thread(merge_metrics, pages)
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def debug(self, request: web.Request) -> web.Response:
        out: dict[str, object] = {}
        for w, status, text in await self._gather(request.path_qs):
            try:
                out[str(w.index)] = json.loads(text) if status == 200 else {"status": status, "error": text}
            except ValueError:
                out[str(w.index)] = text
        return web.json_response({"workers": out})

    # -- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.cfg
        try:
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except Exception as e:
            log.error("epp workers failed to start: %s", e)
            self.stopping = True
            self.signal_all(signal.SIGKILL)
            return 1
        self._tasks = [asyncio.create_task(self._watch(w)) for w in self.workers]
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
        health_server.add_insecure_port(f"{cfg.host}:{cfg.grpc_health_port}")
        await health_server.start()
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        if cfg.debug_endpoints:
            app.router.add_get("/debug/{tail:.*}", self.debug)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, cfg.host, cfg.metrics_port).start()
        log.info("epp supervisor: %d workers on ext_proc %s:%d, health %d, metrics %d", len(self.workers),
                 cfg.host, cfg.grpc_port, cfg.grpc_health_port, cfg.metrics_port)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if cfg.config_file:  # workers reload their config file on SIGHUP (without one they would die of it)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.signal_all(signal.SIGHUP))
        await stop.wait()
        stop.clear()
        self.stopping = True
        self.health.draining = True
        log.info("epp supervisor draining %d workers", len(self.workers))
        self.signal_all(signal.SIGTERM)
        procs = [w.proc.wait() for w in self.workers if w.proc is not None]
        waiting = asyncio.ensure_future(asyncio.gather(*procs))
        while not waiting.done():
            hurry = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiting, hurry}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():  # a second signal hurries every worker
                stop.clear()
                self.signal_all(signal.SIGTERM)
            hurry.cancel()
        for t in self._tasks:
            t.cancel()
        self.health.close()
        await health_server.stop(0)
        await runner.cleanup()
        for w in self.workers:
            if w.channel is not None:
                await w.channel.close()
        log.info("epp supervisor stopped")
        return 0


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def merge_metrics(pages: Sequence[tuple[object, str]], label: str = "worker") -> str:
    """Prometheus pages as one: each family once, every sample labelled with its page's key (``worker="i"``, or
    ``pool="name"`` for epp.pools); a sample that has the label already keeps its own value."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for index, text in pages:
        for fam in text_string_to_metric_families(text):
            # written as prometheus_client writes them: counters by their _total sample, info as a gauge
            name, kind = {"counter": (f"{fam.name}_total", "counter"), "info": (f"{fam.name}_info", "gauge"),
                          "stateset": (fam.name, "gauge")}.get(fam.type, (fam.name, fam.type))
            entry = families.setdefault(name, (kind, fam.documentation, []))
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = {label: str(index), **s.labels}
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                entry[2].append(f"{s.name}{{{rendered}}} {_number(s.value)}")
    out = []
    for name, (kind, doc, lines) in families.items():
        out.append(f"# HELP {name} {doc.replace(chr(92), chr(92) * 2).replace(chr(10), chr(92) + 'n')}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def run_supervisor(cfg: Config, argv: Sequence[str]) -> int:
    setup_logging(cfg.verbosity, cfg.log_format)
    if not cfg.state_store_url:
        log.warning("--workers %d without --state-store-url: each worker routes on its own prefix index and "
                    "in-flight counts", cfg.workers)
    return asyncio.run(Supervisor(cfg, argv).run())
