"""`GET /metrics` for one pod: vLLM V1 metric names, read from engine state at scrape time.

Gauges are computed from the live scheduler and KV cache when scraped, so they always agree with
/sim/state; counters and histograms come from EngineStats, which the engine updates without any
prometheus_client call on its hot path.

The text is rendered here rather than by prometheus_client.generate_latest: the EPP scrapes every pod
every 50 ms and generate_latest costs ~2 ms for these 20 families, while this renderer re-renders a
histogram only when it changed. The same families are also exposed through a per-pod CollectorRegistry
(`PodMetrics.registry`) for code that wants prometheus_client objects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from epp_sim.engine import Engine
from epp_sim.sleep import SLEEP_STATES
from epp_sim.stats import Histogram

_LORA_SERIES_LIMIT = 64


@dataclass(slots=True)
class Family:
    kind: str  # gauge | counter | histogram
    name: str  # without the _total suffix for counters
    doc: str
    samples: list[tuple[dict[str, str], float]] | None = None
    hist: Histogram | None = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class PodMetricsSource:
    """Builds the metric families of one pod from its engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        rc = engine.rc
        self.labels = {"model_name": rc.model_label, "engine": "0"}
        p = rc.profile
        self.cache_info = {
            "block_size": str(p.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "enable_prefix_caching": str(rc.base.enable_prefix_caching),
            "gpu_memory_utilization": "0.9",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(p.num_gpu_blocks),
            "prefix_caching_hash_algo": "xxhash",
            "engine": "0",
        }
        self.lora_enabled = bool(rc.base.lora_adapters)
        # vLLM sets one gauge series per label combination to "now" and never removes old ones;
        # scrapers take the series with the newest timestamp. Keep that shape, bounded.
        self._lora_series: dict[tuple[str, str], float] = {}

    def _one(self, kind: str, name: str, doc: str, value: float) -> Family:
        return Family(kind, name, doc, samples=[(self.labels, value)])

    def families(self) -> Iterator[Family]:
        e = self.engine
        s = e.stats
        kv = e.kv
        g, c = "gauge", "counter"
        yield self._one(g, "vllm:num_requests_running", "Number of requests in model execution batches.",
                        len(e.running))
        yield self._one(g, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                        len(e.waiting))
        yield self._one(g, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv.usage)
        yield Family(g, "vllm:engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; "
                     "awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 "
                     "means sleep level 2.", samples=[({**self.labels, "sleep_state": name},
                                                        1.0 if e.sleep_level == level else 0.0)
                                                       for level, name in SLEEP_STATES.items()])
        yield self._one(c, "vllm:prefix_cache_queries",
                        "Prefix cache queries, in terms of number of queried tokens.", s.prefix_queries)
        yield self._one(c, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                        s.prefix_hits)
        if e.rc.base.legacy_metrics:
            yield self._one(g, "vllm:gpu_cache_usage_perc", "GPU KV-cache usage (deprecated alias).", kv.usage)
            yield self._one(c, "vllm:gpu_prefix_cache_queries", "Deprecated alias.", s.prefix_queries)
            yield self._one(c, "vllm:gpu_prefix_cache_hits", "Deprecated alias.", s.prefix_hits)
        yield self._one(c, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                        s.preemptions)
        yield self._one(c, "vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield self._one(c, "vllm:generation_tokens", "Number of generation tokens processed.",
                        s.generation_tokens)
        reasons = sorted({"stop", "length", "abort", *s.finished})
        yield Family(c, "vllm:request_success", "Count of successfully processed requests.",
                     samples=[({**self.labels, "finished_reason": r}, s.finished.get(r, 0)) for r in reasons])
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", s.itl),
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.", s.itl),
            ("vllm:request_time_per_output_token_seconds",
             "Histogram of time_per_output_token_seconds per request.", s.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
             s.queue_time),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             s.inference_time),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
             s.prefill_time),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
             s.decode_time),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.request_prompt_tokens),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.",
             s.request_generation_tokens),
            ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
             s.request_max_tokens),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
             s.iteration_tokens),
        ):
            yield Family("histogram", name, doc, hist=hist)
        # P/D (sim/pd.py); simulator-only names: vLLM reports its KV connector's transfers in its own way
        yield self._one(c, "sim:pd_prefill_requests", "Requests prefilled here for a remote decode pod.",
                        s.pd_prefills)
        yield self._one(c, "sim:pd_remote_prefill_requests", "Requests decoded here after a remote prefill.",
                        s.pd_remote_prefills)
        yield self._one(c, "sim:pd_kv_pulled_tokens", "Prompt tokens whose KV was pulled from prefill pods.",
                        s.pd_kv_pulled_tokens)
        yield self._one(c, "sim:pd_prefill_fallbacks", "Remote prefills that failed and were done here instead.",
                        s.pd_fallbacks)
        yield Family(g, "vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     samples=[(self.cache_info, 1.0)])
        if self.lora_enabled:
            yield self._lora_family()

    def _lora_family(self) -> Family:
        e = self.engine
        running = ",".join(sorted({r.lora for r in e.running if r.lora}))
        waiting = ",".join(sorted({r.lora for r in e.waiting if r.lora}))
        series = self._lora_series
        series.pop((running, waiting), None)
        series[(running, waiting)] = time.time()
        while len(series) > _LORA_SERIES_LIMIT:
            series.pop(next(iter(series)))
        max_lora = str(e.max_loras)
        return Family("gauge", "vllm:lora_requests_info", "Running stats on lora requests.", samples=[
            ({"max_lora": max_lora, "running_lora_adapters": run, "waiting_lora_adapters": wait}, ts)
            for (run, wait), ts in series.items()])


class _RegistryCollector(Collector):
    def __init__(self, source: PodMetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for fam in self.source.families():
            if fam.hist is not None:
                labels = self.source.labels
                h = HistogramMetricFamily(fam.name, fam.doc, labels=list(labels))
                h.add_metric(list(labels.values()), fam.hist.cumulative(), fam.hist.sum)
                yield h
                continue
            assert fam.samples is not None
            names = list(fam.samples[0][0]) if fam.samples else []
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            m = cls(fam.name, fam.doc, labels=names)
            for labels, value in fam.samples:
                m.add_metric([labels[n] for n in names], value)
            yield m


class PodMetrics:
    """One pod's metrics: a fast text renderer plus its own CollectorRegistry (pods never share series)."""

    def __init__(self, engine: Engine) -> None:
        self.source = PodMetricsSource(engine)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RegistryCollector(self.source))
        self._hist_cache: dict[str, tuple[int, float, str]] = {}
        self._label_str = _labels(self.source.labels)

    def render(self) -> bytes:
        out: list[str] = []
        for fam in self.source.families():
            if fam.hist is not None:
                out.append(self._histogram(fam.name, fam.doc, fam.hist))
                continue
            name = fam.name + "_total" if fam.kind == "counter" else fam.name
            out.append(f"# HELP {name} {fam.doc}\n# TYPE {name} {fam.kind}\n")
            for labels, value in fam.samples or ():
                out.append(f"{name}{_labels(labels)} {_num(value)}\n")
        return "".join(out).encode()

    def _histogram(self, name: str, doc: str, h: Histogram) -> str:
        cached = self._hist_cache.get(name)
        if cached is not None and cached[0] == h.count and cached[1] == h.sum:
            return cached[2]
        labels = self.source.labels
        lines = [f"# HELP {name} {doc}\n# TYPE {name} histogram\n"]
        for le, count in h.cumulative():
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {_num(count)}\n")
        lines.append(f"{name}_count{self._label_str} {_num(h.count)}\n")
        lines.append(f"{name}_sum{self._label_str} {_num(h.sum)}\n")
        text = "".join(lines)
        self._hist_cache[name] = (h.count, h.sum, text)
        return text
