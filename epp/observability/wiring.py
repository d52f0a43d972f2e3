"""Wires the observability parts into one ``EppServer``: decision hooks (log, explanations, tracing),
plugin timings, scrape-time metric sources, and the config-file reloader.

``Observability.attach(server)`` is called once the server has its pool, metrics and director;
``start()`` once it serves; ``stop()`` when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from epp.observability.explain import ExplainPolicy
from epp.observability.hooks import RequestHooks
from epp.observability.instrument import instrument
from epp.observability.tracing import Tracing, tracing_wanted
from epp.reload import ConfigReloader

log = logging.getLogger(__name__)


class Observability:
    def __init__(self, server: Any, hooks: RequestHooks, reloader: ConfigReloader | None) -> None:
        self.server = server
        self.hooks = hooks
        self.reloader = reloader

    @classmethod
    def attach(cls, server: Any) -> Observability:
        cfg = server.cfg
        metrics = server.metrics
        rt = metrics.runtime
        rt.staleness_threshold = cfg.metrics_staleness_threshold
        rt.streams = lambda: server.servicer.active_streams if getattr(server, "servicer", None) else 0
        rt.draining = lambda: server.health.draining
        loop = asyncio.get_running_loop()  # scrapes may be collected off the loop: name it explicitly
        rt.tasks = lambda: len(asyncio.all_tasks(loop))
        rt.config = lambda: server.director.config
        rt.scrape_stats = lambda: server.scraper.all_stats if getattr(server, "scraper", None) else {}
        server.health.strict_names = bool(getattr(cfg, "ha_enable_leader_election", False))  # GIE

        tracing = Tracing.from_environment() if tracing_wanted(cfg.tracing) else None
        policy = ExplainPolicy(cfg.explain_decisions, cfg.explain_token)
        if policy.always:
            log.warning("--explain-decisions: every response carries x-epp-decision (endpoint names and scores)")
        elif policy.per_request:
            log.info("decisions explained for requests carrying x-epp-explain with the explain token")
        hooks = RequestHooks(server.pool, metrics, policy, tracing)
        server.hooks = hooks
        server.director.hooks = hooks
        instrument(server.director.config, metrics)

        reloader = None
        if cfg.config_file:
            def apply(config: Any) -> None:
                old = server.director.config
                if getattr(config, "raw", {}).get("dataLayer") != getattr(old, "raw", {}).get("dataLayer"):
                    log.warning("config file %s: dataLayer (metrics scraping) changes take effect at restart",
                                cfg.config_file)
                server.director.set_config(instrument(config, metrics))

            from epp.scheduling.config import load_config, parse_document

            def load(text: str, doc: Any = None) -> Any:
                return load_config(text, server.pool, previous=server.director.config, doc=doc)

            reloader = ConfigReloader(cfg.config_file, load, apply, metrics, parse=parse_document)
            reloader.started_with(getattr(server, "config_file_text", None))
        server.reloader = reloader
        return cls(server, hooks, reloader)

    async def start(self) -> None:
        if self.reloader is not None:
            await self.reloader.start()

    async def stop(self) -> None:
        if self.reloader is not None:
            await self.reloader.stop()
        if self.hooks.tracing is not None:
            await self.hooks.tracing.shutdown()
