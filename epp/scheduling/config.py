"""``EndpointPickerConfig``: the YAML that names the plugins and the scheduling profiles.

Same format as GIE's EPP (apiVersion ``inference.networking.x-k8s.io/v1alpha1``) and llm-d's
(``llm-d.ai/v1alpha1``). Decoding is strict: unknown fields are errors with the path named.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.admission.config import AdmissionConfig, build_admission_config
from epp.datalayer.pool import EndpointPool
from epp.scheduling.datakeys import check_data_keys
from epp.scheduling.params import DEFAULT_SCORER_STALENESS
from epp.scheduling.plugins import Filter, Picker, Plugin, ProfileHandler, Scorer
from epp.scheduling.registry import PluginConfigError, PluginHandle, instantiate, registered_types
from epp.scheduling.scheduler import Scheduler, SchedulerProfile

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"

# GIE's default: queue x2, kv-cache x2, prefix x3, max-score picker. Available as --config-name gie-default.
GIE_DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""

# EPP's default: one currency, the predicted time to first token (plugins/scorers/latency.py), reading the
# prefix-cache producer's match. See bench/README.md for how it compares in the regimes that hurt.
EPP_DEFAULT_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: predicted-latency-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: predicted-latency-scorer
  - pluginRef: max-score-picker
"""

BUILTIN_CONFIGS = {"epp-default": EPP_DEFAULT_CONFIG, "gie-default": GIE_DEFAULT_CONFIG}  # --config-name
DEFAULT_CONFIG = EPP_DEFAULT_CONFIG

_NOT_YET = ("parser", "requestHandler")
_TOP_FIELDS = {"apiVersion", "kind", "plugins", "schedulingProfiles", "featureGates", "saturationDetector",
               "dataLayer", "flowControl", "parser", "requestHandler"}


@dataclass
class PickerConfig:
    """The built result: every plugin instance and the scheduler wired from them."""

    scheduler: Scheduler
    plugins: dict[str, Plugin]
    handle: PluginHandle
    feature_gates: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, str] = field(default_factory=dict)  # plugin name -> its type and parameters, canonical
    admission: AdmissionConfig | None = None  # saturation detector and flow control (epp.admission)

    def plugins_of(self, kind: type[Any]) -> list[Any]:
        return [p for p in self.plugins.values() if isinstance(p, kind)]


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise PluginConfigError(msg)


def _check_fields(obj: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    _expect(isinstance(obj, dict), f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    _expect(not unknown, f"{where}: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
    missing = sorted(required - set(obj))
    _expect(not missing, f"{where}: missing field(s) {missing}")
    return obj


MAX_CONFIG_BYTES = 1 << 20  # GIE's and llm-d's configurations are a few KiB
_YAML_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it


def parse_document(text: str | None) -> Any:
    """The configuration text as plain data: YAML without aliases (an alias bomb expands a few hundred
    bytes into billions of nodes), at most ``MAX_CONFIG_BYTES``, with every number finite. Pure work with
    no event loop: a live reload runs it on a worker thread."""
    if not text or not text.strip():
        text = DEFAULT_CONFIG
    _expect(len(text) <= MAX_CONFIG_BYTES, f"config is {len(text)} characters; the limit is {MAX_CONFIG_BYTES}")
    try:
        for event in yaml.parse(text, Loader=_YAML_LOADER):
            _expect(not isinstance(event, yaml.AliasEvent), "config: YAML aliases (*name) are not accepted")
        doc = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as e:
        raise PluginConfigError(f"config is not valid YAML: {e}") from None
    _check_finite(doc, "config")
    return doc


def _check_finite(value: Any, where: str) -> None:
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, float):
            _expect(math.isfinite(v), f"{at}: numbers must be finite, got {v}")
        elif isinstance(v, dict):
            stack.extend((x, f"{at}.{k}") for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


def load_config(text: str | None, pool: EndpointPool | None = None,
                previous: PickerConfig | None = None, doc: Any = None,
                metrics_staleness_threshold: float = DEFAULT_SCORER_STALENESS) -> PickerConfig:
    """Parse, validate and instantiate. ``None`` or empty text gives the default config; ``doc`` is the text
    already parsed by ``parse_document``; ``metrics_staleness_threshold`` (--metrics-staleness-threshold) is what
    plugins not given their own ``metricsStalenessThreshold`` trust.

    With ``previous`` (a live reload), a plugin whose name, type and parameters are unchanged is kept,
    state included (e.g. the prefix-cache index), and previous plugins not kept are stopped."""
    if doc is None:
        doc = parse_document(text)
    doc = _check_fields(doc, "config", _TOP_FIELDS, {"apiVersion", "kind"})
    for section in _NOT_YET:
        # GIE/llm-d sections EPP does not implement yet are refused, not accepted and silently ignored
        _expect(not doc.get(section), f"config: {section} is not supported by this EPP yet; remove the section")
    _expect(doc["apiVersion"] in API_VERSIONS, f"config: apiVersion must be one of {list(API_VERSIONS)}")
    _expect(doc["kind"] == KIND, f"config: kind must be {KIND}")
    gates = doc.get("featureGates") or []
    _expect(isinstance(gates, list) and all(isinstance(g, str) for g in gates), "featureGates: expected a list")

    handle = PluginHandle(pool, metrics_staleness_threshold)
    plugins: dict[str, Plugin] = {}
    specs: dict[str, str] = {}
    for i, spec in enumerate(doc.get("plugins") or []):
        spec = _check_fields(spec, f"plugins[{i}]", {"name", "type", "parameters"}, {"type"})
        name = spec.get("name") or spec["type"]
        _expect(name not in plugins, f"plugins[{i}]: duplicate plugin name {name!r}")
        specs[name] = json.dumps([spec["type"], spec.get("parameters")], sort_keys=True, default=str)
        kept = previous.plugins.get(name) if previous and previous.specs.get(name) == specs[name] else None
        if kept is not None:
            kept.handle = handle
            handle.plugins[name] = kept
            plugins[name] = kept
        else:
            plugins[name] = instantiate(spec["type"], name, spec.get("parameters"), handle)

    profile_specs = doc.get("schedulingProfiles") or []
    _expect(isinstance(profile_specs, list), "schedulingProfiles: expected a list")
    if not profile_specs:  # GIE: one default profile referencing every filter, scorer and picker
        profile_specs = [{"name": "default", "plugins": [
            {"pluginRef": n} for n, p in plugins.items() if isinstance(p, (Filter, Scorer, Picker))]}]

    profiles: dict[str, SchedulerProfile] = {}
    for i, pspec in enumerate(profile_specs):
        pspec = _check_fields(pspec, f"schedulingProfiles[{i}]", {"name", "plugins"}, {"name"})
        pname = pspec["name"]
        _expect(pname not in profiles, f"schedulingProfiles[{i}]: duplicate profile name {pname!r}")
        profile = SchedulerProfile(pname)
        for j, ref in enumerate(pspec.get("plugins") or []):
            where = f"schedulingProfiles[{i}].plugins[{j}]"
            ref = _check_fields(ref, where, {"pluginRef", "weight"}, {"pluginRef"})
            plugin = plugins.get(ref["pluginRef"])
            _expect(plugin is not None, f"{where}: pluginRef {ref['pluginRef']!r} is not defined in plugins")
            weight = ref.get("weight", 1)
            _expect(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                    f"{where}: weight must be a non-negative number")
            if isinstance(plugin, Filter):
                profile.filters.append(plugin)
            if isinstance(plugin, Scorer):
                profile.scorers.append((plugin, float(weight)))
            if isinstance(plugin, Picker):
                _expect(profile.picker is None, f"{where}: profile {pname!r} has more than one picker")
                profile.picker = plugin
        if profile.picker is None:  # GIE: the first configured picker, else a new max-score-picker
            pickers = [p for p in plugins.values() if isinstance(p, Picker)]
            profile.picker = pickers[0] if pickers else _default(plugins, "max-score-picker", handle)
        profiles[pname] = profile

    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    _expect(len(handlers) <= 1, "config: more than one profile handler")
    if handlers:
        handler = handlers[0]
    else:
        _expect(len(profiles) == 1, "config: several scheduling profiles need a profile handler plugin")
        handler = _default(plugins, "single-profile-handler", handle)
    assert isinstance(handler, ProfileHandler)
    handler.check_profiles(profiles)
    check_data_keys(plugins, profiles)
    admission = build_admission_config(doc, plugins, handle, gates)  # saturation detector, flow control

    for plugin in plugins.values():
        plugin.start()
    if previous is not None:
        kept_ids = {id(p) for p in plugins.values()}
        for old in previous.plugins.values():
            if id(old) not in kept_ids:
                old.stop()
    return PickerConfig(Scheduler(profiles, handler), plugins, handle, gates, doc, specs, admission)


def _default(plugins: dict[str, Plugin], type_name: str, handle: PluginHandle) -> Any:
    _expect(type_name in registered_types(), f"built-in plugin {type_name!r} is not registered")
    plugin = plugins.get(type_name) or instantiate(type_name, type_name, None, handle)
    plugins[type_name] = plugin
    return plugin
