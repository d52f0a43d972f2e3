"""Data-layer plugins, as GIE names them: where endpoint metrics come from and how they are read.

They hold parameters only; EPP's metrics scraper reads them from the config at start-up.
"""

from __future__ import annotations

from typing import Any

from epp.datalayer.engines import EngineRegistry
from epp.plugin import Plugin, register_plugin


@register_plugin("metrics-data-source")
class MetricsDataSource(Plugin):
    def __init__(self, scheme: str = "http", path: str = "/metrics", insecure_skip_verify: bool = True) -> None:
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
