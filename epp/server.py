"""Process lifecycle: discovery, the ext_proc and health gRPC servers, the metrics HTTP server,
and an orderly stop on SIGTERM (health turns NOT_SERVING, streams in flight finish)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from epp import tls
from epp.config import Config
from epp.datalayer.discovery import Discovery, make_discovery
from epp.datalayer.pool import EndpointPool
from epp.datalayer.scraper import MetricsScraper
from epp.datalayer.sources import CoreMetricsExtractor, MetricsDataSource
from epp.director import Director
from epp.extproc import h2grpc
from epp.extproc.servicer import ExtProcServicer
from epp.extproc.stream import BodyBudget, StreamOptions
from epp.health import HealthServicer
from epp.logs import setup_logging
from epp.objectives import Objectives
from epp.observability.debug import add_debug_routes
from epp.observability.hooks import RequestHooks
from epp.observability.instrument import instrument
from epp.observability.metrics import EppMetrics
from epp.observability.wiring import config_reloader, request_hooks
from epp.pools import PoolSelector, parse_pools
from epp.reload import ConfigReloader
from epp.scheduling.config import BUILTIN_CONFIGS, PickerConfig, load_config
from epp.workers import WorkerLink, merge_metrics

if TYPE_CHECKING:
    from epp.state.store import SharedState
    from epp.trace import TraceRecorder

log = logging.getLogger("epp")

FINAL_GRACE = 5.0  # seconds streams still open at the end of the drain get before they are cancelled


def _config_text(cfg: Config) -> str | None:
    """The scheduling configuration's text: --config-file, --config-name or --config-text (else the default)."""
    if cfg.config_file:
        return Path(cfg.config_file).read_text()
    if cfg.config_name:
        return BUILTIN_CONFIGS[cfg.config_name]
    return cfg.config_text or None


def _make_scraper(cfg: Config, pool: EndpointPool, picker_config: PickerConfig) -> MetricsScraper | None:
    """GIE's data layer: ``metrics-data-source`` + ``core-metrics-extractor`` parameters when configured;
    an explicit ``dataLayer: {sources: []}`` turns scraping off."""
    data_layer = picker_config.raw.get("dataLayer")
    if isinstance(data_layer, dict) and data_layer.get("sources") == []:
        log.info("metrics scraping disabled by dataLayer.sources: []")
        return None
    source = next(iter(picker_config.plugins_of(MetricsDataSource)), None) or MetricsDataSource()
    extractor = next(iter(picker_config.plugins_of(CoreMetricsExtractor)), None) or CoreMetricsExtractor()
    return MetricsScraper(pool, cfg.refresh_metrics_interval, engines=extractor.engines,
                          path=source.path, scheme=source.scheme)


@dataclass
class PoolRouting:
    """One pool's routing, without listeners: its metrics, director (scheduling configuration, request hooks),
    config reloader, discovery, scraping and shared state. Built, wired and started by ``open``."""

    cfg: Config
    pool: EndpointPool
    metrics: EppMetrics
    hooks: RequestHooks  # decision log, explanations, tracing: the director calls them
    director: Director
    reloader: ConfigReloader | None  # --config-file, started once the process serves
    discovery: Discovery
    scraper: MetricsScraper | None  # None: dataLayer.sources is []
    state: SharedState | None  # --state-store-url

    @classmethod
    async def open(cls, cfg: Config, pool: EndpointPool, process: EppServer | None = None) -> PoolRouting:
        """``process``: the server whose open streams and drain state this pool's metrics export (the first
        pool's: process-wide gauges are exported once)."""
        text = _config_text(cfg)
        metrics = EppMetrics(pool)
        hooks = request_hooks(cfg, pool, metrics)
        picker_config = load_config(text, pool, metrics_staleness_threshold=cfg.metrics_staleness_threshold)
        instrument(picker_config, metrics)  # every plugin call timed
        objectives = Objectives(priorities=dict(cfg.static_objectives))
        director = Director(pool, picker_config, cfg.disable_endpoint_subset_filter, metrics=metrics,
                            objectives=objectives, hooks=hooks)
        state = None
        if cfg.state_store_url:  # active-active replicas / --workers: share picks and load (epp.state)
            from epp.state.store import SharedState, StoreCollector, StoreOptions, prefix_producers

            state = SharedState(StoreOptions.from_config(cfg), pool, lambda: prefix_producers(director.config))
            metrics.registry.register(StoreCollector(lambda: [state]))
        routing = cls(cfg, pool, metrics, hooks, director, config_reloader(cfg, director, metrics, text),
                      make_discovery(cfg, pool, objectives), _make_scraper(cfg, pool, picker_config), state)

        rt = metrics.runtime  # what the scrape-time collectors read
        rt.staleness_threshold = cfg.metrics_staleness_threshold
        if process is not None:
            rt.streams = process.active_streams
            rt.transport = lambda: process.grpc_server
            rt.draining = lambda: process.health.draining
        loop = asyncio.get_running_loop()  # scrapes may be collected off the loop: name it explicitly
        rt.tasks = lambda: len(asyncio.all_tasks(loop))
        rt.config = lambda: director.config
        scraper = routing.scraper
        rt.scrape_stats = (lambda: scraper.all_stats) if scraper is not None else dict

        await routing.discovery.start()
        if scraper is not None:
            await scraper.start()
        if state is not None:
            await state.start()
        return routing

    def ready(self) -> bool:
        return self.pool.synced and self.discovery.is_leader()

    async def stop(self) -> None:
        if self.scraper is not None:
            await self.scraper.stop()
        if self.state is not None:
            await self.state.stop()
        await self.discovery.stop()
        await self.director.waker.close()
        if self.reloader is not None:
            await self.reloader.stop()
        if self.hooks.tracing is not None:
            await self.hooks.tracing.shutdown()
        for plugin in self.director.config.plugins.values():  # e.g. KV-event ingestion threads, remote clients
            try:
                plugin.stop()
            except Exception:
                log.exception("plugin %s did not stop cleanly", getattr(plugin, "name", plugin))


class EppServer:
    """Everything one EPP process runs; ``start``/``stop`` so tests can embed it. ``start`` builds and wires it:
    one ``PoolRouting`` per pool (one unless --pools-file), then the listeners serving them all."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.health = HealthServicer(self.ready, strict_names=cfg.ha_enable_leader_election)  # as GIE
        self.units: dict[str, PoolRouting] = {}  # pool name -> its routing, the default pool's first
        self.recorder: TraceRecorder | None = None  # --record-trace
        self.servicer: ExtProcServicer | None = None
        self.cert_reloader: tls.CertReloader | None = None  # --enable-cert-reload
        self.grpc_server: h2grpc.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = self.health_port = self.metrics_port = 0  # bound once serving (0 in cfg: any free port)

    @property
    def routing(self) -> PoolRouting:
        """The first pool's routing (the only one without --pools-file)."""
        return next(iter(self.units.values()))

    def ready(self) -> bool:
        return bool(self.units) and all(u.ready() for u in self.units.values())

    def active_streams(self) -> int:
        return self.servicer.active_streams if self.servicer is not None else 0

    async def start(self) -> None:
        specs = parse_pools(Path(self.cfg.pools_file).read_text(), self.cfg) if self.cfg.pools_file else []
        if specs:  # --pools-file: the first pool's configuration also sets the listeners'
            self.cfg = specs[0].cfg
        for pool, cfg in [(EndpointPool(s.name), s.cfg) for s in specs] or [(EndpointPool(), self.cfg)]:
            self.units[pool.name] = await PoolRouting.open(cfg, pool, process=None if self.units else self)
        selector = None
        if specs:
            selector = PoolSelector({n: u.director for n, u in self.units.items()},
                                    next((s.name for s in specs if s.default), None))
            self.health.named = {f"pool/{n}": u.ready for n, u in self.units.items()}  # readiness per pool
        await self.start_serving(selector)

    async def start_serving(self, selector: PoolSelector | None) -> None:
        cfg = self.cfg
        limits = StreamOptions(max_body_bytes=cfg.max_request_body_bytes, max_json_depth=cfg.max_json_depth,
                               decision_header=cfg.decision_header, max_messages=cfg.max_request_messages,
                               max_prompt_chars=cfg.max_prompt_chars, max_prompt_tokens=cfg.max_prompt_tokens,
                               max_body_chunks=cfg.max_request_body_chunks,
                               budget=BodyBudget(cfg.max_buffered_body_bytes),
                               trust_rewrite_header=cfg.trust_model_rewrite_header,
                               trust_objective_header=cfg.trust_objective_header)
        if cfg.record_trace:  # one file per process: workers would interleave their lines
            from epp.trace import TraceRecorder

            path = cfg.record_trace + (f".{cfg.worker_index}" if cfg.worker_index >= 0 else "")
            self.recorder = TraceRecorder(path, cfg.record_trace_max_bytes)
        for unit in self.units.values():
            d = unit.director
            d.recorder = self.recorder
            d.admission.budget = limits.budget  # bodies held by flow control count against it too
            d.waker.configure(cfg.wake_timeout, cfg.sleep_idle_time, cfg.sleep_level, cfg.accelerator_budget)
            d.waker.start()
            d.models.deployments = dict(cfg.model_deployments)
        self.servicer = ExtProcServicer(self.routing.director, limits, selector)
        server_tls = None
        if cfg.secure_serving:
            server_tls, self.cert_reloader = tls.server_tls(cfg.cert_path, cfg.enable_cert_reload, cfg.client_ca_path)
        # Envoy health-checks the ext_proc cluster on the ext_proc port itself (GIE's Envoy config does).
        max_streams, max_age = cfg.extproc_connection_limits
        self.grpc_server = h2grpc.Server(self.servicer.methods(self.health), cfg.grpc_max_recv_msg_size, server_tls,
                                         max_concurrent_streams=max_streams, max_connection_age=max_age)

        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(f"{cfg.host}:{cfg.grpc_health_port}")

        link = WorkerLink.from_env(self.grpc_server, cfg.worker_index) if cfg.worker_index >= 0 else None
        if link is not None:  # a worker: the supervisor owns the port and hands connections over (epp.workers)
            link.start()
            self.grpc_port = cfg.grpc_port
        else:
            self.grpc_port = await self.grpc_server.start(cfg.host, cfg.grpc_port)
        await self.health_server.start()
        self._http = web.AppRunner(self._metrics_app(), access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, cfg.host, cfg.metrics_port)
        await site.start()
        self.metrics_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for unit in self.units.values():
            if unit.reloader is not None:
                await unit.reloader.start()
        log.info("epp serving: ext_proc %s:%d (%s), health %d, metrics %d, %d endpoints",
                 cfg.host, self.grpc_port,
                 ("mutual tls" if cfg.client_ca_path else "tls") if cfg.secure_serving else "plaintext",
                 self.health_port, self.metrics_port, len(self.routing.pool.endpoints))

    def _metrics_app(self) -> web.Application:
        def render() -> bytes:
            if len(self.units) > 1:  # one page, each pool's series labelled pool="name"
                pages = [(n, generate_latest(u.metrics.registry).decode()) for n, u in self.units.items()]
                return merge_metrics(pages, "pool").encode() + generate_latest(REGISTRY)
            return generate_latest(self.routing.metrics.registry) + generate_latest(REGISTRY)  # ours + process/python

        async def metrics(_: web.Request) -> web.Response:
            # Rendered on a worker thread: however large the page, a scrape never holds the event loop
            # that routes requests. Collectors copy what they read (see epp.observability.metrics).
            body = await asyncio.to_thread(render)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        if self.cfg.debug_endpoints:
            add_debug_routes(app, self)
        return app

    async def drain(self, timeout: float, quiet_period: float = 0.0, hurry: asyncio.Event | None = None) -> None:
        """The SIGTERM path. Health turns NOT_SERVING at once (liveness stays SERVING) while every stream,
        new ones included, is still served: proxies need a few health-check intervals to move away.
        The drain lasts ``timeout`` seconds (GIE/llm-d), or, with ``quiet_period`` > 0, ends earlier once
        no stream has been open for that long and a health probe has been told NOT_SERVING. Then new
        streams are refused and those still open get ``FINAL_GRACE`` seconds. ``hurry`` (a second
        signal) ends the drain at once."""
        self.health.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        idle_since: float | None = None
        reason = "drain timeout reached"
        while (now := loop.time()) < deadline:
            if hurry is not None and hurry.is_set():
                reason = "second signal"
                break
            if quiet_period > 0:
                if self.active_streams() == 0 and self.health.not_serving_answers > 0:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= quiet_period:
                        reason = f"no stream for {quiet_period:g}s"
                        break
                else:
                    idle_since = None
            await asyncio.sleep(min(0.05, max(0.0, deadline - now)))
        open_streams = self.active_streams()
        log.info("epp drain over (%s): %d stream(s) still open get %.0fs", reason, open_streams,
                 0 if reason == "second signal" else FINAL_GRACE)
        await self.stop(grace=0 if reason == "second signal" else FINAL_GRACE)

    async def stop(self, grace: float = FINAL_GRACE) -> None:
        self.health.draining = True
        self.health.close()  # ends Watch streams, which would hold the grace period up
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self._http is not None:
            await self._http.cleanup()
        for unit in self.units.values():
            await unit.stop()
        if self.recorder is not None:
            self.recorder.close()


async def run(cfg: Config) -> int:
    setup_logging(cfg.verbosity, cfg.log_format)
    if cfg.worker_index >= 0:
        from epp.lifetime import die_with_parent

        die_with_parent()  # SIGTERM when the supervisor dies, however it dies
    server = EppServer(cfg)
    try:
        await server.start()
    except Exception as e:
        log.error("epp failed to start: %s", e)
        return 1
    # What startup built (modules, protobuf descriptors, tokenizers, plugins) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise scan it all and pause routing and streaming for tens
    # of milliseconds each time.
    gc.collect()
    gc.freeze()
    if cfg.worker_index >= 0:
        from epp.workers import announce

        announce(server.health_port, server.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader = server.routing.reloader
    if reloader is not None:  # SIGHUP: look at the config file now
        loop.add_signal_handler(signal.SIGHUP, reloader.check)
    await stop.wait()
    stop.clear()  # a second signal hurries the drain
    log.info("epp draining: NOT_SERVING, still serving for up to %gs%s", cfg.drain_timeout,
             f" (less once idle for {cfg.drain_quiet_period:g}s)" if cfg.drain_quiet_period > 0 else "")
    try:
        await server.drain(cfg.drain_timeout, cfg.drain_quiet_period, hurry=stop)
    except Exception:
        log.exception("error while stopping")
    log.info("epp stopped")
    return 0
