"""Builds one pool's observability parts for ``epp.server``, which wires them in one place (``PoolRouting.open``):
the request hooks the director calls (decision log, explanations, tracing) and the config-file reloader that swaps
the director's configuration, plugin timings included. These build and return; they set nothing on the server.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from epp.observability.explain import ExplainPolicy
from epp.observability.hooks import RequestHooks
from epp.observability.instrument import instrument
from epp.observability.tracing import Tracing, tracing_wanted
from epp.reload import ConfigReloader
from epp.scheduling.config import PickerConfig, load_config, parse_document

if TYPE_CHECKING:
    from epp.config import Config
    from epp.datalayer.pool import EndpointPool
    from epp.director import Director
    from epp.observability.metrics import EppMetrics

log = logging.getLogger(__name__)


def request_hooks(cfg: Config, pool: EndpointPool, metrics: EppMetrics) -> RequestHooks:
    """Decision log, explanations (--explain-decisions, --explain-token) and tracing (--tracing), for the director."""
    tracing = Tracing.from_environment() if tracing_wanted(cfg.tracing) else None
    policy = ExplainPolicy(cfg.explain_decisions, cfg.explain_token)
    if policy.always:
        log.warning("--explain-decisions: every response carries x-epp-decision (endpoint names and scores)")
    elif policy.per_request:
        log.info("decisions explained for requests carrying x-epp-explain with the explain token")
    return RequestHooks(pool, metrics, policy, tracing)


def config_reloader(cfg: Config, director: Director, metrics: EppMetrics,
                    started_with: str | None) -> ConfigReloader | None:
    """--config-file, watched: a valid new configuration replaces the director's, its plugins timed as the first
    one's (``instrument``). ``started_with``: the text the server loaded, so that a change made meanwhile is seen."""
    if not cfg.config_file:
        return None
    def load(text: str, doc: Any = None) -> PickerConfig:
        return load_config(text, director.pool, previous=director.config, doc=doc,
                           metrics_staleness_threshold=cfg.metrics_staleness_threshold)

    def apply(config: PickerConfig) -> None:
        if config.raw.get("dataLayer") != director.config.raw.get("dataLayer"):
            log.warning("config file %s: dataLayer (metrics scraping) changes take effect at restart", cfg.config_file)
        director.set_config(instrument(config, metrics))

    reloader = ConfigReloader(cfg.config_file, load, apply, metrics, parse=parse_document)
    reloader.started_with(started_with)
    return reloader
