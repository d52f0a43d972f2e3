"""Which metrics each model-server engine exposes, and how they become ``EndpointMetrics``.

Mirrors GIE's ``core-metrics-extractor``: built-in specs for vllm, sglang, trtllm-serve and
triton-tensorrt-llm; an endpoint's engine comes from its pod label ``engineLabelKey`` (default
``inference.networking.k8s.io/engine-type``), else ``defaultEngine`` (``vllm``); ``engineConfigs``
entries replace a built-in of the same name entirely (an omitted or ``""`` spec disables that metric).

Failure policy of ``EngineSpec.extract``: the three load metrics (queued, running, KV usage) are all or
nothing -- if any enabled one is missing or not finite the scrape fails and nothing is applied. LoRA and
cache info are optional and their absence is reported in ``Extracted.missing``: vLLM only exposes
``vllm:lora_requests_info`` when LoRA is enabled, so an absent LoRA family means "no adapters"; absent
cache info leaves block size / block count as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.datalayer.endpoint import Endpoint, EndpointMetrics
from epp.datalayer.promtext import Sample, Selector, SelectorError

ENGINE_LABEL_KEY = "inference.networking.k8s.io/engine-type"
DEFAULT_ENGINE = "vllm"

LORA_RUNNING_LABEL = "running_lora_adapters"
LORA_WAITING_LABEL = "waiting_lora_adapters"
LORA_MAX_LABEL = "max_lora"
MODEL_NAME_LABEL = "model_name"  # the served model on vLLM's and SGLang's series


class EngineConfigError(ValueError):
    pass


@dataclass(slots=True)
class Extracted:
    """One scrape's worth of values; ``None`` = not configured or not found."""

    waiting_requests: int | None = None
    running_requests: int | None = None
    kv_cache_usage: float | None = None
    active_models: frozenset[str] | None = None
    waiting_models: frozenset[str] | None = None
    max_active_models: int | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    sleeping: bool | None = None  # vLLM sleep mode (vllm:engine_sleep_state); None: not reported
    served_model: str | None = None  # the ``model_name`` label of the load series (vLLM, SGLang)
    missing: list[str] = field(default_factory=list)  # optional families absent from the page
    warnings: list[str] = field(default_factory=list)  # optional values present but unreadable

    def apply(self, m: EndpointMetrics) -> None:
        """Copy every found value into ``m`` (does not touch ``updated_at`` / ``last_error``)."""
        if self.waiting_requests is not None:
            m.waiting_requests = self.waiting_requests
        if self.running_requests is not None:
            m.running_requests = self.running_requests
        if self.kv_cache_usage is not None:
            m.kv_cache_usage = self.kv_cache_usage
        if self.active_models is not None:
            m.active_models = self.active_models
        if self.waiting_models is not None:
            m.waiting_models = self.waiting_models
        if self.max_active_models is not None:
            m.max_active_models = self.max_active_models
        if self.block_size is not None:
            m.block_size = self.block_size
        if self.num_gpu_blocks is not None:
            m.num_gpu_blocks = self.num_gpu_blocks
        m.sleeping = bool(self.sleeping)
        if self.served_model:
            m.served_model = self.served_model


class ExtractError(Exception):
    """A required (load) metric could not be read; the message is short enough for ``last_error``."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    name: str
    queued: Selector | None = None
    running: Selector | None = None
    kv_usage: Selector | None = None
    lora: Selector | None = None
    # Info-style metric whose *labels* carry the cache geometry (vLLM, SGLang) ...
    cache_info: Selector | None = None
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    # ... or two plain gauges (TensorRT-LLM).
    cache_block_size: Selector | None = None
    cache_num_blocks: Selector | None = None
    # Sleep mode: the series whose label ``sleep_state`` is ``awake`` is 0 while the engine sleeps (vLLM).
    sleep_state: Selector | None = None
    families: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        sels = (self.queued, self.running, self.kv_usage, self.lora, self.cache_info,
                self.cache_block_size, self.cache_num_blocks, self.sleep_state)
        object.__setattr__(self, "families", frozenset(s.family for s in sels if s is not None))

    # -- config ---------------------------------------------------------------------------------

    _KEYS = {
        "queuedRequestsSpec": "queued",
        "runningRequestsSpec": "running",
        "kvUsageSpec": "kv_usage",
        "loraSpec": "lora",
        "cacheInfoSpec": "cache_info",
        "cacheBlockSizeSpec": "cache_block_size",
        "cacheNumBlocksSpec": "cache_num_blocks",
        "sleepStateSpec": "sleep_state",
    }

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> EngineSpec:
        """One GIE ``engineConfigs`` item. Omitted specs are disabled: an entry replaces a built-in
        wholesale, as in GIE."""
        if not isinstance(entry, Mapping):
            raise EngineConfigError(f"engine config must be a mapping, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise EngineConfigError("engine config name cannot be empty")
        allowed = {"name", "cacheBlockSizeLabel", "cacheNumBlocksLabel", *cls._KEYS}
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise EngineConfigError(f"engine {name!r}: unknown field(s) {unknown}")
        kwargs: dict[str, Any] = {}
        for key, attr in cls._KEYS.items():
            raw = entry.get(key) or ""
            if not isinstance(raw, str):
                raise EngineConfigError(f"engine {name!r}: {key} must be a string")
            try:
                kwargs[attr] = Selector.parse(raw) if raw.strip() else None
            except SelectorError as e:
                raise EngineConfigError(f"engine {name!r}: {key}: {e}") from None
        for key, attr in (("cacheBlockSizeLabel", "cache_block_size_label"),
                          ("cacheNumBlocksLabel", "cache_num_blocks_label")):
            if entry.get(key):
                kwargs[attr] = str(entry[key])
        return cls(name.strip(), **kwargs)

    # -- extraction -----------------------------------------------------------------------------

    def extract(self, families: Mapping[str, Sequence[Sample]]) -> Extracted:
        """Turn parsed families (family name -> samples, as ``promtext.parse`` returns) into values.

        Raises ``ExtractError`` when a configured load metric is missing or not finite."""
        out = Extracted()
        if self.queued is not None:
            out.waiting_requests = int(_required(self.queued, families))
        if self.running is not None:
            out.running_requests = int(_required(self.running, families))
            latest = self.running.latest(families[self.running.family])
            out.served_model = latest.labels.get(MODEL_NAME_LABEL) if latest is not None else None
        if self.kv_usage is not None:
            out.kv_cache_usage = _required(self.kv_usage, families)
        if self.lora is not None:
            self._extract_lora(families, out)
        if self.cache_info is not None:
            self._extract_cache_info(families, out)
        if self.cache_block_size is not None:
            out.block_size = _optional_int(self.cache_block_size, families, out)
        if self.cache_num_blocks is not None:
            out.num_gpu_blocks = _optional_int(self.cache_num_blocks, families, out)
        if self.sleep_state is not None:  # absent (no sleep mode): awake, and nothing to report
            for sample in self.sleep_state.select(families.get(self.sleep_state.family, ())):
                if sample.labels.get("sleep_state") == "awake":
                    out.sleeping = sample.value < 0.5
                    break
        return out

    def _extract_lora(self, families: Mapping[str, Sequence[Sample]], out: Extracted) -> None:
        assert self.lora is not None
        samples = families.get(self.lora.family)
        if not samples:
            # vLLM without --enable-lora has no such family: no adapters (and none left over from before).
            out.missing.append(self.lora.family)
            out.active_models = out.waiting_models = frozenset()
            out.max_active_models = 0
            return
        # vLLM sets a new series to the current unix time whenever the adapter set changes and
        # never removes old ones: the largest value is the current state (including "none running").
        best: Sample | None = None
        for s in self.lora.select(samples):
            if best is None or s.value > best.value:
                best = s
        if best is None:
            out.missing.append(str(self.lora))
            return
        out.active_models = _adapter_set(best.labels.get(LORA_RUNNING_LABEL, ""))
        out.waiting_models = _adapter_set(best.labels.get(LORA_WAITING_LABEL, ""))
        raw_max = best.labels.get(LORA_MAX_LABEL, "")
        if raw_max:
            try:
                out.max_active_models = int(raw_max)
            except ValueError:
                out.warnings.append(f"{LORA_MAX_LABEL}={raw_max[:20]!r}")

    def _extract_cache_info(self, families: Mapping[str, Sequence[Sample]], out: Extracted) -> None:
        assert self.cache_info is not None
        s = self.cache_info.latest(families.get(self.cache_info.family, ()))
        if s is None:
            out.missing.append(str(self.cache_info))
            return
        for label, attr in ((self.cache_block_size_label, "block_size"),
                            (self.cache_num_blocks_label, "num_gpu_blocks")):
            raw = s.labels.get(label)
            if raw is None or raw in ("", "None"):  # vLLM renders an unset num_gpu_blocks as "None"
                continue
            try:
                setattr(out, attr, int(float(raw)))
            except ValueError:
                out.warnings.append(f"{label}={raw[:20]!r}")


def _required(sel: Selector, families: Mapping[str, Sequence[Sample]]) -> float:
    samples = families.get(sel.family)
    if not samples:
        raise ExtractError(f"metric family {sel.family!r} not found")
    s = sel.latest(samples)
    if s is None:
        raise ExtractError(f"no series matches {sel}")
    if not math.isfinite(s.value):
        raise ExtractError(f"{sel} = {s.value}")
    return s.value


def _optional_int(sel: Selector, families: Mapping[str, Sequence[Sample]], out: Extracted) -> int | None:
    s = sel.latest(families.get(sel.family, ()))
    if s is None:
        out.missing.append(str(sel))
        return None
    if not math.isfinite(s.value):
        out.warnings.append(f"{sel} = {s.value}")
        return None
    return int(s.value)


def _adapter_set(raw: str) -> frozenset[str]:
    return frozenset(a for a in (p.strip() for p in raw.split(",")) if a)


def _s(spec: str) -> Selector:
    return Selector.parse(spec)


# GIE's built-in engine specs (its core-metrics-extractor's defaults), metric names as each engine exports them.
BUILTIN_ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        "vllm",
        queued=_s("vllm:num_requests_waiting"),
        running=_s("vllm:num_requests_running"),
        kv_usage=_s("vllm:kv_cache_usage_perc"),
        lora=_s("vllm:lora_requests_info"),
        cache_info=_s("vllm:cache_config_info"),
        cache_block_size_label="block_size",
        cache_num_blocks_label="num_gpu_blocks",
        sleep_state=_s("vllm:engine_sleep_state"),
    ),
    "sglang": EngineSpec(
        "sglang",
        queued=_s("sglang:num_queue_reqs"),
        running=_s("sglang:num_running_reqs"),
        kv_usage=_s("sglang:token_usage"),
        cache_info=_s("sglang:cache_config_info"),
        cache_block_size_label="page_size",
        cache_num_blocks_label="num_pages",
    ),
    "trtllm-serve": EngineSpec(
        "trtllm-serve",
        queued=_s("trtllm_num_requests_waiting"),
        running=_s("trtllm_num_requests_running"),
        kv_usage=_s("trtllm_kv_cache_utilization"),
        cache_block_size=_s("trtllm_kv_cache_tokens_per_block"),
        cache_num_blocks=_s("trtllm_kv_cache_max_blocks"),
    ),
    "triton-tensorrt-llm": EngineSpec(
        "triton-tensorrt-llm",
        queued=_s("nv_trt_llm_request_metrics{request_type=waiting}"),
        running=_s("nv_trt_llm_request_metrics{request_type=scheduled}"),
        kv_usage=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
        cache_block_size=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
        cache_num_blocks=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
    ),
}


class EngineRegistry:
    """Engine specs by name plus the rule that picks one for an endpoint."""

    def __init__(
        self,
        engine_configs: Iterable[Mapping[str, Any] | EngineSpec] = (),
        *,
        default_engine: str = DEFAULT_ENGINE,
        engine_label_key: str = ENGINE_LABEL_KEY,
    ) -> None:
        specs: dict[str, EngineSpec] = {}
        for entry in engine_configs:
            spec = entry if isinstance(entry, EngineSpec) else EngineSpec.from_config(entry)
            if spec.name in specs:
                raise EngineConfigError(f"engine {spec.name!r} configured twice")
            specs[spec.name] = spec
        self.engines: dict[str, EngineSpec] = {**BUILTIN_ENGINES, **specs}
        self.default_engine = default_engine or DEFAULT_ENGINE
        self.engine_label_key = engine_label_key or ENGINE_LABEL_KEY
        if self.default_engine not in self.engines:
            raise EngineConfigError(f"defaultEngine {self.default_engine!r} not found in engineConfigs")
        self.default = self.engines[self.default_engine]

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> EngineRegistry:
        """GIE ``core-metrics-extractor`` parameters: ``engineLabelKey``, ``defaultEngine``,
        ``engineConfigs``."""
        params = params or {}
        unknown = sorted(set(params) - {"engineLabelKey", "defaultEngine", "engineConfigs"})
        if unknown:
            raise EngineConfigError(f"unknown metrics extractor parameter(s) {unknown}")
        configs = params.get("engineConfigs") or []
        if not isinstance(configs, list):
            raise EngineConfigError("engineConfigs must be a list")
        return cls(configs, default_engine=params.get("defaultEngine") or DEFAULT_ENGINE,
                   engine_label_key=params.get("engineLabelKey") or ENGINE_LABEL_KEY)

    def get(self, name: str) -> EngineSpec | None:
        return self.engines.get(name)

    def for_endpoint(self, endpoint: Endpoint) -> EngineSpec:
        """The labelled engine; unlabelled or unknown engine names fall back to the default engine."""
        name = endpoint.labels.get(self.engine_label_key)
        if not name:
            return self.default
        return self.engines.get(name, self.default)

    def is_known(self, endpoint: Endpoint) -> bool:
        name = endpoint.labels.get(self.engine_label_key)
        return not name or name in self.engines
