"""``--workers N``: N EPP processes serving one ext_proc port, under a supervisor that speaks for them.

Each worker is a whole EPP (``python -m epp`` with the same flags) with its health and metrics ports on ephemeral
loopback ports that it reports to the supervisor through a pipe. Routing state stays coherent across workers through
the shared store (``--state-store-url``, epp.state), as across replicas; without one each worker routes on what it
sees.

The ext_proc port is the supervisor's: it accepts each connection and hands it (``socket.send_fds`` over a Unix
socket per worker) to the worker with the least load, read from a small shared file in which every worker publishes
its load (``connection_load``) every ``PUBLISH_INTERVAL``. Why not SO_REUSEPORT: Envoy multiplexes every ext_proc
stream on about one HTTP/2 connection per Envoy worker thread, and the kernel's hash of so few connections put all of
them on one worker in most starts (issue 13). Placement alone cannot split one connection, so under ``--workers`` each
connection also carries at most ``--grpc-max-concurrent-streams`` streams (Envoy opens more connections as
concurrency grows) and lives ``--grpc-max-connection-age`` (a graceful GOAWAY: Envoy opens a new one, placed anew,
while the streams in flight finish), epp.extproc.h2grpc.

The supervisor serves what a deployment probes and scrapes, aggregated:

* gRPC health on ``--grpc-health-port``: SERVING when every worker is ready (each polled every ``POLL`` s); the
  ext_proc port's own health is answered by whichever worker Envoy's connection landed on.
* ``/metrics`` on ``--metrics-port``: every worker's page, each sample labelled ``worker="i"`` (sum by pool,
  endpoint, ... in PromQL); ``/debug/...``: each worker's answer under its index.
* SIGTERM drains every worker (each runs its own drain; the supervisor keeps handing them connections until they
  exit) and waits for them; SIGHUP reaches every worker (config reload); a worker that dies unexpectedly is started
  again (meanwhile the others take the new connections; connection ages bring it its share back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from epp.config import Config
from epp.extproc import h2grpc
from epp.health import HealthServicer
from epp.logs import setup_logging

log = logging.getLogger("epp.workers")

FD_ENV = "EPP_WORKER_FD"  # a worker writes its ports, as one JSON line, to this file descriptor
LINK_FD_ENV = "EPP_WORKER_LINK_FD"  # a Unix socket over which the supervisor hands the worker ext_proc connections
LOAD_FD_ENV = "EPP_WORKER_LOAD_FD"  # the shared file where each worker publishes its load, in its slot
SLOT = struct.Struct("<QQQ")  # a worker's slot: connections received, load (see connection_load), streams open
PUBLISH_INTERVAL = 0.05  # seconds between a worker's load updates
YOUNG = 1.0  # seconds a new connection counts as full: Envoy opened it for streams it is about to send
HEALTH_PREFIX = "/grpc.health.v1.Health/"
POLL = 0.5  # seconds between readiness polls of each worker
RESTART_DELAY = 1.0  # seconds before a worker that died is started again
_SERVING = health_pb2.HealthCheckResponse.SERVING


def announce(health_port: int, metrics_port: int) -> None:
    """In a worker, once serving: tell the supervisor where its health and metrics are."""
    fd = os.environ.pop(FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "health": health_port, "metrics": metrics_port}) + "\n")


class WorkerLink:
    """In a worker: serve the ext_proc connections the supervisor hands over, and publish the load it places by."""

    def __init__(self, server: h2grpc.Server, index: int, link_fd: int, load_fd: int) -> None:
        self.server = server
        self.offset = index * SLOT.size
        self.sock = socket.socket(fileno=link_fd)
        self.sock.setblocking(False)
        self.load = mmap.mmap(load_fd, 0)
        os.close(load_fd)  # the mapping stays
        self.received = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def from_env(cls, server: h2grpc.Server, index: int) -> WorkerLink | None:
        link, load = os.environ.pop(LINK_FD_ENV, None), os.environ.pop(LOAD_FD_ENV, None)
        return None if link is None or load is None else cls(server, index, int(link), int(load))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._receive)
        self._publish()

    def _receive(self) -> None:
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("connection hand-over failed: %s", e)
                return
            if not msg and not fds:  # the supervisor is gone (the worker follows it: epp.lifetime)
                self._loop.remove_reader(self.sock.fileno())
                return
            if not fds:
                log.error("a handed connection was lost (out of file descriptors?)")
            for fd in fds:
                self._loop.create_task(self._adopt(socket.socket(fileno=fd)))

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.server.adopt(sock)
        except Exception as e:  # the peer may be gone already
            log.debug("handed connection not served: %r", e)
            sock.close()
        self.received += 1  # only now: until it is in server.connections, the supervisor counts it as in transit
        self._publish()

    def _publish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server = self.server
        now = self._loop.time()
        limit = server.max_concurrent_streams
        load = sum(connection_load(len(c.calls), now - c.opened_at, limit, c.paths) for c in list(server.connections))
        SLOT.pack_into(self.load, self.offset, self.received, load, server.active_calls)
        self._timer = self._loop.call_later(PUBLISH_INTERVAL, self._publish)


def connection_load(streams: int, age: float, limit: int, paths: Collection[str] = ()) -> int:
    """What a connection weighs when placing the next one: its streams, up to the per-connection limit (a client may
    open more before it learns the limit, briefly), and the whole limit while it is young (Envoy's pool opens a
    connection when the others are full and fills the newest first), unless all it carried is health checks (Envoy's
    health checker keeps a connection of its own). An idle one (Envoy keeps them) weighs nothing."""
    streams = min(streams, limit) if limit else streams
    if age >= YOUNG or (paths and all(p.startswith(HEALTH_PREFIX) for p in paths)):
        return streams
    return max(streams, limit or 1)


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    health_port: int = 0
    metrics_port: int = 0
    ready: bool = False
    restarts: int = 0
    link: socket.socket | None = field(default=None, repr=False)  # the supervisor's end; None: takes no connection
    handed: int = 0  # connections handed to this process (its slot counts those it received)
    handed_total: int = 0  # across restarts
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
        self._load_file = tempfile.TemporaryFile()  # noqa: SIM115  # open as long as the supervisor
        self._load_file.truncate(SLOT.size * len(self.workers))
        self.load = mmap.mmap(self._load_file.fileno(), 0)
        self.listeners: list[socket.socket] = []
        self.accepting = False
        self.grpc_port = cfg.grpc_port
        self._turn = 0  # breaks ties between equally loaded workers in turn
        self.stream_limit = cfg.extproc_connection_limits[0]  # the workers' --grpc-max-concurrent-streams

    @property
    def local_host(self) -> str:
        return "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "") else self.cfg.host

    # -- workers --------------------------------------------------------------------------------------

    async def _spawn(self, w: Worker) -> None:
        rfd, wfd = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        SLOT.pack_into(self.load, w.index * SLOT.size, 0, 0, 0)
        load_fd = self._load_file.fileno()
        env = {**os.environ, FD_ENV: str(wfd), LINK_FD_ENV: str(theirs.fileno()), LOAD_FD_ENV: str(load_fd)}
        # a session of its own: a terminal's Ctrl-C reaches the supervisor, which passes it on once
        try:
            w.proc = await asyncio.create_subprocess_exec(*worker_argv(self.argv, w.index), env=env,
                                                          pass_fds=(wfd, theirs.fileno(), load_fd),
                                                          start_new_session=True)
        except BaseException:
            ours.close()
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
            theirs.close()
        loop = asyncio.get_running_loop()
        try:
            line = await loop.run_in_executor(None, _read_line, rfd)
        finally:
            os.close(rfd)
        if not line:
            ours.close()
            raise RuntimeError(f"worker {w.index} exited before serving")
        ours.setblocking(False)
        w.link, w.handed = ours, 0
        self._accept(True)  # resumes accepting if it waited for a worker
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
                self._unlink(w)
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

    # -- connections -------------------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind the ext_proc port (every address of --host, as asyncio's servers do)."""
        cfg = self.cfg
        infos = socket.getaddrinfo(cfg.host or None, cfg.grpc_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(1024)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self.listeners.append(sock)
        self.grpc_port = self.listeners[0].getsockname()[1]

    def _accept(self, on: bool) -> None:
        """Watch the listeners or not. Off while no worker can take a connection: connections wait in the backlog."""
        if on == self.accepting or not self.listeners:
            return
        self.accepting = on
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            if on:
                loop.add_reader(sock.fileno(), self._on_connections, sock)
            else:
                loop.remove_reader(sock.fileno())

    def load_of(self, w: Worker) -> tuple[int, int]:
        """The worker's connections weighed (connection_load), those handed to it not taken yet as full ones; then its
        streams."""
        received, load, streams = SLOT.unpack_from(self.load, w.index * SLOT.size)
        return load + max(0, w.handed - received) * (self.stream_limit or 1), streams

    def _on_connections(self, listener: socket.socket) -> None:
        while True:
            takers = [w for w in self.workers if w.link is not None]
            if not takers:
                self._accept(False)
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, say: wait a little instead of spinning
                log.error("ext_proc accept failed: %s", e)
                self._accept(False)
                asyncio.get_running_loop().call_later(1.0, self._accept, True)
                return
            with conn:
                self.hand(conn, takers)

    def hand(self, conn: socket.socket, takers: list[Worker]) -> Worker | None:
        """Hand ``conn`` to the ready worker with the least load (ties in turn); the next one if that one fails."""
        self._turn += 1
        n = len(self.workers)
        order = sorted(takers, key=lambda w: (not w.ready, self.load_of(w), (w.index - self._turn) % n))
        for w in order:
            assert w.link is not None
            try:
                socket.send_fds(w.link, [b"c"], [conn.fileno()])
            except OSError as e:  # exited, or not reading: the next one
                log.warning("worker %d did not take a connection: %s", w.index, e)
                continue
            w.handed += 1
            w.handed_total += 1
            return w
        log.error("no worker took an ext_proc connection; closed")
        return None

    def _unlink(self, w: Worker) -> None:
        if w.link is not None:
            w.link.close()  # connections handed but not taken are closed with it
            w.link = None

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
        body += "# HELP epp_worker_connections_handed_total ext_proc connections the supervisor handed to the worker.\n"
        body += "# TYPE epp_worker_connections_handed_total counter\n"
        body += "".join(f'epp_worker_connections_handed_total{{worker="{w.index}"}} {w.handed_total}\n'
                        for w in self.workers)
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
            self.listen()
            await asyncio.gather(*(self._spawn(w) for w in self.workers))
        except Exception as e:
            log.error("epp workers failed to start: %s", e)
            self.stopping = True
            self.signal_all(signal.SIGKILL)
            self._close_listeners()
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
                 cfg.host, self.grpc_port, cfg.grpc_health_port, cfg.metrics_port)

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
        self._close_listeners()  # kept open until the workers exit: draining, they still take connections
        for w in self.workers:
            self._unlink(w)
        self.health.close()
        await health_server.stop(0)
        await runner.cleanup()
        for w in self.workers:
            if w.channel is not None:
                await w.channel.close()
        log.info("epp supervisor stopped")
        return 0

    def _close_listeners(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._accept(False)
        for sock in self.listeners:
            sock.close()
        self.listeners = []


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
