"""The ``flowControl`` and ``saturationDetector`` sections of an ``EndpointPickerConfig``, as llm-d and GIE write them.

```yaml
featureGates: [flowControl]            # flow control on; without it, legacy admission (below)
plugins:
- type: concurrency-detector
  parameters: {maxConcurrency: 16}
- type: round-robin-fairness-policy
saturationDetector: {pluginRef: concurrency-detector}   # GIE's place; llm-d v1: flowControl.saturationDetector
flowControl:
  maxBytes: 10Gi                       # all bands together (0: no limit); Kubernetes quantities or integers
  maxRequests: 0
  defaultRequestTTL: 60s               # queue-wait budget while the pool has endpoints (0s: none)
  noEndpointRequestTTL: 5m             # ... while it has none (scale from zero); default: defaultRequestTTL
  defaultPriorityBand: {maxBytes: 1G, maxRequests: 5000}
  defaultNegativePriorityBand: {maxRequests: 50}        # template for priorities < 0 (sheddable)
  priorityBands:
  - {priority: 10, maxRequests: 500, fairnessPolicyRef: round-robin-fairness-policy,
     orderingPolicyRef: fcfs-ordering-policy, defaultRequestTTL: 30s}
  usageLimitPolicyPluginRef: static-usage-limit-policy   # or priority-holdback-policy (headroom for the top)
```

Without the ``flowControl`` feature gate, requests are never held (legacy admission, GIE's and llm-d's default):
a sheddable request (priority < 0) is refused with 429 when the saturation detector says the pool is
saturated; every other request is routed at once. A ``flowControl`` section without the gate is refused (llm-d
ignores it with a warning; a configuration is never accepted and ignored here), except one holding only
``saturationDetector``, which legacy admission uses.

Defaults are llm-d's: band ``maxBytes`` 1 GB, ``maxRequests`` 5000, ``defaultRequestTTL`` 60s,
``noEndpointRequestTTL`` = ``defaultRequestTTL``, policies ``global-strict-fairness-policy``,
``fcfs-ordering-policy``, ``static-usage-limit-policy``, detector ``utilization-detector`` -- each instantiated
with default parameters when the configuration names no plugin of that type.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from epp.admission.interfaces import FairnessPolicy, OrderingPolicy, SaturationDetector, UsageLimitPolicy
from epp.config import parse_duration
from epp.scheduling.plugins import Plugin
from epp.scheduling.registry import PluginConfigError, PluginHandle, instantiate, registered_types

FEATURE_GATE = "flowControl"
DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_USAGE_LIMIT = "static-usage-limit-policy"
DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_BAND_MAX_REQUESTS = 5000
DEFAULT_REQUEST_TTL = 60.0

_TOP = {"maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
        "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "bandSelectionPolicyPluginRef",
        "saturationDetector", "enableEviction"}
_BAND = {"priority", "maxBytes", "maxRequests", "defaultRequestTTL", "fairnessPolicyRef", "orderingPolicyRef"}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_SUFFIX = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}


def _fail(msg: str) -> PluginConfigError:
    return PluginConfigError(msg)


def parse_quantity(value: Any, where: str) -> int:
    """A Kubernetes quantity (``10Gi``, ``1G``, ``500``) or a non-negative integer, as an integer."""
    if isinstance(value, bool):
        raise _fail(f"{where}: expected a quantity (e.g. 500, 1G, 10Gi), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise _fail(f"{where}: must not be negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    m = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise _fail(f"{where}: expected a quantity (e.g. 500, 1G, 10Gi), got {value!r}")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def parse_ttl(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise _fail(f"{where}: expected a duration (e.g. 30s, 5m), got {value!r}")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(str(value))
    except ValueError as e:
        raise _fail(f"{where}: {e}") from None
    if seconds < 0 or not math.isfinite(seconds):
        raise _fail(f"{where}: must be a non-negative duration")
    return seconds


@dataclass
class BandConfig:
    max_bytes: int = DEFAULT_BAND_MAX_BYTES  # 0: no limit
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS  # 0: no limit
    ttl: float | None = None  # None: the global defaultRequestTTL
    fairness: FairnessPolicy | None = None
    ordering: OrderingPolicy | None = None


@dataclass
class FlowControlConfig:
    max_bytes: int = 0
    max_requests: int = 0
    default_ttl: float = DEFAULT_REQUEST_TTL
    no_endpoint_ttl: float = DEFAULT_REQUEST_TTL
    default_band: BandConfig = field(default_factory=BandConfig)
    default_negative_band: BandConfig | None = None
    bands: dict[int, BandConfig] = field(default_factory=dict)
    usage_limit: UsageLimitPolicy | None = None

    def band(self, priority: int) -> BandConfig:
        found = self.bands.get(priority)
        if found is not None:
            return found
        if priority < 0 and self.default_negative_band is not None:
            return self.default_negative_band
        return self.default_band

    def ttl(self, priority: int) -> float:
        band = self.band(priority).ttl
        return self.default_ttl if band is None else band


@dataclass
class AdmissionConfig:
    detector: SaturationDetector
    flow_control: FlowControlConfig | None = None  # None: legacy admission


def _check(obj: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(f"{where}: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
    return obj


class _Plugins:
    """The configuration's plugins, and built-in policies / detectors instantiated with default parameters when
    it names none (kept apart: they are not part of the configuration's plugin list)."""

    def __init__(self, declared: dict[str, Plugin], handle: PluginHandle) -> None:
        self.declared = declared
        self.handle = handle
        self.defaults: dict[str, Plugin] = {}

    def default(self, type_name: str, kind: type) -> Any:
        """The configuration's first plugin of ``type_name``, else one with default parameters."""
        for plugin in self.declared.values():
            if plugin.type_name == type_name and isinstance(plugin, kind):
                return plugin
        return self._builtin(type_name)

    def _builtin(self, type_name: str) -> Any:
        found = self.defaults.get(type_name)
        if found is None:
            if type_name not in registered_types():
                raise _fail(f"built-in plugin {type_name!r} is not registered")
            found = self.defaults[type_name] = instantiate(type_name, type_name, None, self.handle)
        return found

    def ref(self, name: Any, kind: type, where: str, role: str) -> Any:
        """The plugin named ``name``; a built-in type name not declared in ``plugins`` (GIE's configurations
        refer to ``fcfs-ordering-policy`` that way) gets one with default parameters."""
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}: expected the name of a plugin")
        plugin = self.declared.get(name)
        if plugin is None:
            cls = registered_types().get(name)
            if cls is None or not issubclass(cls, kind):
                raise _fail(f"{where}: plugin {name!r} is not defined in plugins")
            plugin = self._builtin(name)
        if not isinstance(plugin, kind):
            raise _fail(f"{where}: plugin {name!r} ({plugin.type_name}) is not a {role}")
        return plugin


def _band(spec: Any, where: str, plugins: _Plugins, template: bool) -> BandConfig:
    spec = _check(spec, where, _BAND - ({"priority"} if template else set()))
    band = BandConfig()
    if "maxBytes" in spec:
        band.max_bytes = parse_quantity(spec["maxBytes"], f"{where}.maxBytes") or DEFAULT_BAND_MAX_BYTES
    if "maxRequests" in spec:
        band.max_requests = parse_quantity(spec["maxRequests"], f"{where}.maxRequests")
    if "defaultRequestTTL" in spec:
        band.ttl = parse_ttl(spec["defaultRequestTTL"], f"{where}.defaultRequestTTL")
    band.fairness = (plugins.ref(spec["fairnessPolicyRef"], FairnessPolicy, f"{where}.fairnessPolicyRef",
                                 "fairness policy") if spec.get("fairnessPolicyRef")
                     else plugins.default(DEFAULT_FAIRNESS, FairnessPolicy))
    band.ordering = (plugins.ref(spec["orderingPolicyRef"], OrderingPolicy, f"{where}.orderingPolicyRef",
                                 "ordering policy") if spec.get("orderingPolicyRef")
                     else plugins.default(DEFAULT_ORDERING, OrderingPolicy))
    return band


def build_admission_config(doc: dict[str, Any], declared: dict[str, Plugin], handle: PluginHandle,
                           gates: list[str]) -> AdmissionConfig:
    """The admission part of a configuration (``declared``: the configuration's plugins by name)."""
    plugins = _Plugins(declared, handle)
    fc = doc.get("flowControl")
    if fc is not None:
        fc = _check(fc, "flowControl", _TOP)
    top_ref = doc.get("saturationDetector")
    nested_ref = fc.get("saturationDetector") if fc else None
    if top_ref is not None and nested_ref is not None:
        raise _fail("saturationDetector: set it at the top level or under flowControl, not both")
    detector_ref, where = (top_ref, "saturationDetector") if top_ref is not None else \
        (nested_ref, "flowControl.saturationDetector")
    if detector_ref is not None:
        detector_ref = _check(detector_ref, where, {"pluginRef"})
        detector = (plugins.ref(detector_ref["pluginRef"], SaturationDetector, f"{where}.pluginRef",
                                "saturation detector") if detector_ref.get("pluginRef")
                    else plugins.default(DEFAULT_DETECTOR, SaturationDetector))
    else:
        detector = plugins.default(DEFAULT_DETECTOR, SaturationDetector)

    enabled = FEATURE_GATE in gates
    if not enabled:
        if fc and set(fc) - {"saturationDetector"}:
            raise _fail("flowControl: the section needs `featureGates: [flowControl]` to take effect; add the "
                        "gate or remove the section (without it EPP never holds requests: legacy admission)")
        return AdmissionConfig(detector)

    fc = fc or {}
    if fc.get("enableEviction"):
        raise _fail("flowControl.enableEviction: eviction of requests already dispatched is not supported by this "
                    "EPP; remove the field (queued sheddable requests are still displaced first)")
    if fc.get("bandSelectionPolicyPluginRef"):
        raise _fail("flowControl.bandSelectionPolicyPluginRef: not supported by this EPP (bands are served in "
                    "strict priority order); remove the field")
    cfg = FlowControlConfig()
    if "maxBytes" in fc:
        cfg.max_bytes = parse_quantity(fc["maxBytes"], "flowControl.maxBytes")
    if "maxRequests" in fc:
        cfg.max_requests = parse_quantity(fc["maxRequests"], "flowControl.maxRequests")
    if "defaultRequestTTL" in fc:
        cfg.default_ttl = parse_ttl(fc["defaultRequestTTL"], "flowControl.defaultRequestTTL")
    cfg.no_endpoint_ttl = (parse_ttl(fc["noEndpointRequestTTL"], "flowControl.noEndpointRequestTTL")
                           if "noEndpointRequestTTL" in fc else cfg.default_ttl)
    cfg.default_band = _band(fc.get("defaultPriorityBand") or {}, "flowControl.defaultPriorityBand", plugins,
                             template=True)
    if fc.get("defaultNegativePriorityBand") is not None:
        cfg.default_negative_band = _band(fc["defaultNegativePriorityBand"], "flowControl.defaultNegativePriorityBand",
                                          plugins, template=True)
    bands = fc.get("priorityBands") or []
    if not isinstance(bands, list):
        raise _fail("flowControl.priorityBands: expected a list")
    for i, spec in enumerate(bands):
        where = f"flowControl.priorityBands[{i}]"
        if not isinstance(spec, dict) or "priority" not in spec:
            raise _fail(f"{where}: missing field(s) ['priority']")
        priority = spec["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise _fail(f"{where}.priority: expected an integer, got {priority!r}")
        if priority in cfg.bands:
            raise _fail(f"{where}: duplicate priority {priority}")
        cfg.bands[priority] = _band(spec, where, plugins, template=False)
    ref = fc.get("usageLimitPolicyPluginRef")
    cfg.usage_limit = (plugins.ref(ref, UsageLimitPolicy, "flowControl.usageLimitPolicyPluginRef",
                                   "usage limit policy") if ref
                       else plugins.default(DEFAULT_USAGE_LIMIT, UsageLimitPolicy))
    return AdmissionConfig(detector, cfg)
