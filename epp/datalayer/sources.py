"""The data layer's configuration types, as GIE names them: where endpoint metrics come from
(``metrics-data-source``) and how they are read (``core-metrics-extractor``).

Core, not built-in plugins: EPP's metrics scraper runs on their defaults when a configuration names neither, so
they live beside the scraper and the registry registers them itself (``epp.scheduling.registry.CORE_TYPES``).
They hold parameters only; the server reads them from the configuration at start-up.
"""

from __future__ import annotations

from typing import Any

from epp.datalayer.engines import EngineRegistry
from epp.scheduling.plugins import Plugin
from epp.scheduling.registry import register_plugin

METRICS_SCHEME, METRICS_PATH = "http", "/metrics"  # where a model server's metrics are, unless configured


@register_plugin("metrics-data-source")
class MetricsDataSource(Plugin):
    def __init__(self, scheme: str = METRICS_SCHEME, path: str = METRICS_PATH,
                 insecure_skip_verify: bool = True) -> None:
        if scheme not in ("http", "https"):
            raise ValueError("scheme must be http or https")
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        self.scheme = scheme
        self.path = path
        self.insecure_skip_verify = insecure_skip_verify


@register_plugin("core-metrics-extractor")
class CoreMetricsExtractor(Plugin):
    def __init__(self, engine_label_key: str | None = None, default_engine: str | None = None,
                 engine_configs: list[dict[str, Any]] | None = None) -> None:
        params = {"engineLabelKey": engine_label_key, "defaultEngine": default_engine,
                  "engineConfigs": engine_configs or []}
        self.engines = EngineRegistry.from_params({k: v for k, v in params.items() if v is not None})
