"""EPP's Prometheus metrics, with GIE's names, types and labels, plus our own (``epp_*``).

Label cardinality is bounded: request ids never become labels; model names (chosen by clients, at most
256 characters) are labels once a model server answered one with success, and provisionally before that
(``MAX_PROVISIONAL_MODEL_LABELS`` at a time): a name no server serves -- a typo, or a client flooding
made-up names -- loses its series when its requests end, and ``other`` counts what finds no free slot;
``MAX_MODEL_LABELS`` names in all. Endpoint labels
follow the pool (a removed endpoint's series go away with it), and plugin labels come from the
configuration.

Hot-path histograms that run several times per request (plugin timings, prefix hit ratio) are
``FastHistogram``: a bisect and two additions on the event-loop thread, exported at scrape time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from epp.api.errors import EppError
from epp.api.types import InferenceRequest
from epp.config import Config
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool
from epp.observability.audit import PredictionAudit, plugin_audits

MAX_MODEL_LABELS = 100
MAX_PROVISIONAL_MODEL_LABELS = 16
_SERIES_KEY = "epp.metrics.series"  # request.attributes: the series a request was counted in when routed
_M = ("model_name", "target_model_name")
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144)
_SIZES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
_DURATION = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
             120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SCHED = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_TPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5, 2)
_PLUGIN = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.1)
_RATIO = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_MARGIN = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# GIE's error codes for its error counter, by HTTP status.
_ERROR_CODES = {400: "BadRequest", 413: "BadRequest", 429: "ResourceExhausted", 500: "Internal",
                503: "ServiceUnavailable"}


class FastHistogram:
    """A histogram child without a lock, for the event-loop thread (where every observation and
    every scrape of EPP runs). ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class FastHistogramFamily(Collector):
    """A labelled family of ``FastHistogram``; children are created on first use and kept."""

    def __init__(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.doc, self.label_names, self.bounds = name, doc, list(labels), tuple(buckets)
        self.children: dict[tuple[str, ...], FastHistogram] = {}

    def labels(self, *values: str) -> FastHistogram:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name}: expected labels {self.label_names}, got {values}")
            child = self.children[values] = FastHistogram(self.bounds)
        return child

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for values, child in list(self.children.items()):
            fam.add_metric(list(values), child.buckets(), child.sum)
        yield fam


class Runtime:
    """Live sources the scrape-time collectors read; the server fills in what it runs."""

    def __init__(self) -> None:
        self.streams: Callable[[], int] = lambda: 0  # ext_proc streams open now
        self.transport: Callable[[], Any] = lambda: None  # the ext_proc port's h2grpc.Server, once serving
        self.draining: Callable[[], bool] = lambda: False
        self.tasks: Callable[[], int] = lambda: 0  # asyncio tasks alive on EPP's event loop
        self.config: Callable[[], Any] = lambda: None  # the PickerConfig in force
        # Endpoint -> object with ``scrapes``, ``errors`` and ``restarts`` counters (the MetricsScraper's stats).
        self.scrape_stats: Callable[[], dict[Any, Any]] = dict
        self.staleness_threshold = Config.metrics_staleness_threshold  # seconds, until the server sets the flag's


def prefix_index_size(config: Any) -> int | None:
    """Entries in the prefix-cache scorers' indexes (block hashes summed over endpoints), or None
    when no plugin of the configuration keeps one. Reads ``indexer_size()`` when a plugin offers it,
    else the ``_index`` mapping of endpoint -> LRU that ``prefix-cache-scorer`` keeps."""
    if config is None:
        return None
    total, found = 0, False
    for plugin in list(getattr(config, "plugins", {}).values()):
        sizer = getattr(plugin, "indexer_size", None)
        if callable(sizer):
            total += int(sizer())
            found = True
            continue
        index = getattr(plugin, "_index", None)
        if isinstance(index, dict):
            total += sum(len(v) for v in list(index.values()))
            found = True
    return total if found else None


class _PluginCollector(Collector):
    """Metrics a plugin of the configuration in force offers (``metric_families()``), at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        for plugin in list(getattr(self.runtime.config(), "plugins", {}).values()):
            families = getattr(plugin, "metric_families", None)
            if callable(families):
                yield from families()


class _PoolCollector(Collector):
    """Pool gauges computed at scrape time from the live endpoints (no timer to keep them fresh)."""

    def __init__(self, pool: EndpointPool, runtime: Runtime | None = None) -> None:
        self.pool = pool
        self.runtime = runtime or Runtime()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        eps = self.pool.endpoints
        name = self.pool.name
        n = len(eps) or 1

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["name"])
            g.add_metric([name], value)
            return g

        yield gauge("inference_pool_average_kv_cache_utilization", "Average KV-cache utilization of the pool.",
                    sum(e.metrics.kv_cache_usage for e in eps) / n)
        yield gauge("inference_pool_average_queue_size", "Average waiting requests per endpoint.",
                    sum(e.metrics.waiting_requests for e in eps) / n)
        yield gauge("inference_pool_average_running_requests", "Average running requests per endpoint.",
                    sum(e.metrics.running_requests for e in eps) / n)
        yield gauge("inference_pool_ready_pods", "Endpoints in the pool.", len(eps))
        per_pod = GaugeMetricFamily("inference_pool_per_pod_queue_size", "Waiting requests per endpoint.",
                                    labels=["name", "model_server_pod"])
        inflight = GaugeMetricFamily("epp_endpoint_inflight_requests", "Requests EPP routed that have not ended.",
                                     labels=["endpoint"])
        age = GaugeMetricFamily("epp_endpoint_metrics_age_seconds",
                                "Seconds since the endpoint's metrics were last scraped successfully (-1: never).",
                                labels=["endpoint"])
        stale = GaugeMetricFamily("epp_endpoint_metrics_stale",
                                  "1 when the endpoint's metrics are older than --metrics-staleness-threshold.",
                                  labels=["endpoint"])
        error = GaugeMetricFamily("epp_endpoint_scrape_error", "1 when the endpoint's last metrics scrape failed.",
                                  labels=["endpoint"])
        sleeping = GaugeMetricFamily("epp_endpoint_sleeping", "1 when the endpoint's engine reports it sleeps (vLLM "
                                     "sleep mode): not a candidate until woken.", labels=["endpoint"])
        unreachable = GaugeMetricFamily("epp_endpoint_unreachable",
                                        "1 when the endpoint stopped answering scrapes and is not offered as a "
                                        "candidate (unless no endpoint answers).", labels=["endpoint"])
        rt = self.runtime
        threshold = rt.staleness_threshold
        now = time.monotonic()
        for e in eps:
            per_pod.add_metric([name, e.name], e.metrics.waiting_requests)
            inflight.add_metric([e.name], e.inflight_requests)
            a = e.metrics.age(now)
            age.add_metric([e.name], -1.0 if a == float("inf") else a)
            stale.add_metric([e.name], 1.0 if a > threshold else 0.0)
            error.add_metric([e.name], 1.0 if e.metrics.last_error else 0.0)
            unreachable.add_metric([e.name], 1.0 if e.metrics.unreachable else 0.0)
            sleeping.add_metric([e.name], 1.0 if e.asleep else 0.0)
        yield per_pod
        yield inflight
        yield age
        yield stale
        yield error
        yield unreachable
        yield sleeping
        stats = rt.scrape_stats()
        scrapes = CounterMetricFamily("epp_endpoint_scrapes", "Metrics scrapes attempted, per endpoint.",
                                      labels=["endpoint"])
        errors = CounterMetricFamily("epp_endpoint_scrape_errors", "Metrics scrapes that failed, per endpoint.",
                                     labels=["endpoint"])
        restarts = CounterMetricFamily("epp_endpoint_restarts", "Model-server restarts seen in the endpoint's "
                                       "metrics (a counter going backwards, a new process start time); each one "
                                       "clears what EPP believed the endpoint cached.", labels=["endpoint"])
        for e in eps:
            st = stats.get(e)
            if st is not None:
                scrapes.add_metric([e.name], st.scrapes)
                errors.add_metric([e.name], st.errors)
                restarts.add_metric([e.name], st.restarts)
        yield scrapes
        yield errors
        yield restarts
        yield GaugeMetricFamily("epp_extproc_streams", "ext_proc streams open (requests in flight through EPP).",
                                value=rt.streams())
        server = rt.transport()
        if server is not None:  # how Envoy spreads its streams over connections (and, under --workers, workers)
            yield GaugeMetricFamily("epp_extproc_connections", "HTTP/2 connections open on the ext_proc port.",
                                    value=len(server.connections))
            yield CounterMetricFamily("epp_extproc_connections_accepted", "HTTP/2 connections accepted on the "
                                      "ext_proc port (with --workers: handed to this worker).",
                                      value=server.connections_total)
            yield CounterMetricFamily("epp_extproc_connections_aged", "ext_proc connections told to go away for "
                                      "their age (--grpc-max-connection-age).", value=server.connections_aged)
            yield CounterMetricFamily("epp_extproc_streams_refused", "ext_proc streams refused over "
                                      "--grpc-max-concurrent-streams (the client had the limit).",
                                      value=server.streams_refused)
        yield GaugeMetricFamily("epp_asyncio_tasks", "asyncio tasks alive on EPP's event loop (a leak shows here).",
                                value=rt.tasks())
        yield GaugeMetricFamily("epp_python_allocated_blocks",
                                "Memory blocks held by Python's allocator: flat while the process grows means "
                                "the growth is outside Python objects.", value=sys.getallocatedblocks())
        yield GaugeMetricFamily("epp_draining", "1 after SIGTERM, while EPP drains.", value=1 if rt.draining() else 0)
        yield from _audit_families(plugin_audits(rt.config()))
        for plugin in list(getattr(rt.config(), "plugins", {}).values()):  # a plugin's own families, if any
            families = getattr(plugin, "metric_families", None)
            if callable(families):
                yield from families()
        size = prefix_index_size(rt.config())
        if size is not None:
            yield GaugeMetricFamily("inference_extension_prefix_indexer_size",
                                    "Block hashes held by the approximate prefix-cache index.", value=size)


def _audit_families(audits: dict[str, PredictionAudit]) -> Iterator[Any]:
    """Predictions against outcomes (epp.observability.audit): prefix-cache hits in tokens, TTFT in seconds."""
    if not audits:
        return
    outcome = CounterMetricFamily("epp_prefix_prediction", "Completed requests by predicted vs reported prefix-cache "
                                  "hit (hit, miss, false_hit, false_miss).", labels=["source", "outcome"])
    tokens = HistogramMetricFamily("epp_prefix_prediction_error_tokens", "Absolute error of the predicted cached "
                                   "tokens against the cached_tokens the server reported.", labels=["source"])
    ttft = HistogramMetricFamily("epp_ttft_prediction_error_seconds", "Absolute error of the predicted time to "
                                 "first token against the time EPP saw the first response byte.", labels=["source"])
    for source, audit in audits.items():
        buckets, total = audit.histogram()
        if audit.unit == "tokens":
            tokens.add_metric([source], buckets, total)
            for name, n in audit.confusion.items():
                outcome.add_metric([source, name], n)
        else:
            ttft.add_metric([source], buckets, total)
    yield outcome
    yield tokens
    yield ttft


@dataclass(slots=True)
class _ModelSeries:
    total: Any
    sizes: Any
    running: Any
    duration: Any
    response_sizes: Any
    server_errors: Any
    input_tokens: Any
    output_tokens: Any
    ntpot: Any
    cached_tokens: Any


class EppMetrics:
    def __init__(self, pool: EndpointPool, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.runtime = Runtime()
        self.request_total = Counter("inference_objective_request_total", "Requests routed.", [*_M, "priority"],
                                     registry=r)
        self.request_errors = Counter("inference_objective_request_error_total", "Requests that failed.",
                                      [*_M, "error_code"], registry=r)
        self.request_duration = Histogram("inference_objective_request_duration_seconds",
                                          "Request duration, from the request headers to the end of the response.",
                                          _M, buckets=_DURATION, registry=r)
        self.request_sizes = Histogram("inference_objective_request_sizes", "Request body sizes in bytes.", _M,
                                       buckets=_SIZES, registry=r)
        self.response_sizes = Histogram("inference_objective_response_sizes", "Response body sizes in bytes.", _M,
                                        buckets=_SIZES, registry=r)
        self.input_tokens = Histogram("inference_objective_input_tokens", "Prompt tokens reported by the server.",
                                      _M, buckets=_TOKENS, registry=r)
        self.output_tokens = Histogram("inference_objective_output_tokens", "Output tokens reported by the server.",
                                       _M, buckets=_TOKENS, registry=r)
        self.cached_tokens = Histogram("inference_objective_prompt_cached_tokens",
                                       "Prompt tokens served from the prefix cache.", _M, buckets=_TOKENS, registry=r)
        self.running = Gauge("inference_objective_running_requests", "Requests in flight.", ["model_name"],
                             registry=r)
        self.ntpot = Histogram("inference_objective_normalized_time_per_output_token_seconds",
                               "Request duration divided by output tokens.", _M, buckets=_TPOT, registry=r)
        self.scheduler_e2e = Histogram("inference_extension_scheduler_e2e_duration_seconds",
                                       "Time to schedule one request.", buckets=_SCHED, registry=r)
        self.scheduler_attempts = Counter("inference_extension_scheduler_attempts_total", "Scheduling attempts.",
                                          ["status"], registry=r)
        self.info = Gauge("inference_extension_info", "EPP build.", ["commit", "build_ref"], registry=r)
        self.decisions = Counter("epp_decisions_total", "Requests routed, by picked endpoint.", ["endpoint"],
                                 registry=r)
        self.rejections = Counter("epp_rejections_total", "Requests EPP answered itself, by reason and status.",
                                  ["reason", "status"], registry=r)
        # P/D (plugins/disagg.py): llm-d's decision types; epp_decisions_total counts the decode pick
        self.pd_decisions = Counter("epp_pd_decisions_total", "Prefill/decode decisions: decode-only or "
                                    "prefill-decode.", ["decision_type"], registry=r)
        self.prefill_decisions = Counter("epp_prefill_decisions_total", "Requests prefilled on a prefill endpoint, "
                                         "by that endpoint.", ["endpoint"], registry=r)
        self.plugin_duration = FastHistogramFamily(
            "inference_extension_plugin_duration_seconds", "Time spent in one plugin call.",
            ["extension_point", "plugin_type", "plugin_name"], _PLUGIN)
        hit_ratio = FastHistogramFamily(
            "inference_extension_prefix_indexer_hit_ratio",
            "Best prefix match over the candidates, as a fraction of the request's blocks.", [], _RATIO)
        margin = FastHistogramFamily(
            "epp_decision_margin", "Picked endpoint's total score minus the best other one's (explained decisions).",
            [], _MARGIN)
        for family in (self.plugin_duration, hit_ratio, margin):
            r.register(family)
        self.prefix_hit_ratio = hit_ratio.labels()
        self.decision_margin = margin.labels()
        self.config_reloads = Counter("epp_config_reloads", "EndpointPickerConfig file reloads, by result.",
                                      ["result"], registry=r)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.config_loaded = Gauge("epp_config_last_reload_success_timestamp_seconds",
                                   "When the scheduling configuration in force was loaded.", registry=r)
        self.config_loaded.set_to_current_time()
        r.register(_PoolCollector(pool, self.runtime))
        r.register(_PluginCollector(self.runtime))
        self.info.labels("dev", "main").set(1)
        self._models: set[str] = set()  # model names a server answered with success
        self._provisional: dict[str, int] = {}  # name -> requests in flight, until one succeeds
        self._series_cache: dict[tuple[str, str, int], _ModelSeries] = {}
        self._decisions: dict[str, Any] = {}
        self._attempts_success = self.scheduler_attempts.labels("success")
        pool.add_listener(self._forget_endpoints)

    def _forget_endpoints(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """Endpoint-labelled series leave with their endpoint (pods come and go; series must not pile up)."""
        kept = {x.name for x in added}
        for e in removed:
            if e.name not in kept:
                self._decisions.pop(e.name, None)
                with contextlib.suppress(KeyError):
                    self.decisions.remove(e.name)
                with contextlib.suppress(KeyError):
                    self.prefill_decisions.remove(e.name)

    def _model(self, name: str) -> str:
        """The label for a model name: the name once a server answered it with success; before that, the name
        while a provisional slot is free (so a new model is counted under its own name from its first request);
        else ``other``. A provisional name whose requests all failed loses its series again."""
        if not name or name in self._models or name in self._provisional:
            return name
        if (len(self._provisional) < MAX_PROVISIONAL_MODEL_LABELS
                and len(self._models) + len(self._provisional) < MAX_MODEL_LABELS):
            self._provisional[name] = 0
            return name
        return "other"

    def _settle(self, request: InferenceRequest, success: bool) -> None:
        """A request counted under provisional names ended: success makes them labels for good; a name left
        with no request in flight and no success is removed, series and all."""
        for name in {request.model, request.target_model}:
            if name not in self._provisional:
                continue
            if success:
                del self._provisional[name]
                self._models.add(name)
                continue
            self._provisional[name] -= 1
            if self._provisional[name] <= 0:
                del self._provisional[name]
                self._drop_series(name)

    def _drop_series(self, name: str) -> None:
        for key in [k for k in self._series_cache if name in (k[0], k[1])]:
            del self._series_cache[key]
        for family in (self.request_total, self.request_errors, self.request_duration, self.request_sizes,
                       self.response_sizes, self.input_tokens, self.output_tokens, self.ntpot, self.cached_tokens,
                       self.running):
            for values in [v for v in list(family._metrics) if name in v]:  # no public listing of children
                with contextlib.suppress(KeyError):
                    family.remove(*values)

    def labels(self, request: InferenceRequest | None) -> tuple[str, str]:
        if request is None:
            return "", ""
        return self._model(request.model), self._model(request.target_model)

    def _series(self, request: InferenceRequest) -> _ModelSeries:
        """The labelled children for this request's (model, target, priority), resolved once and cached:
        ``labels()`` takes a lock and builds tuples, too slow to repeat per request."""
        key = (request.model, request.target_model, request.priority)
        series = self._series_cache.get(key)
        if series is None:
            m = self.labels(request)
            series = _ModelSeries(
                total=self.request_total.labels(*m, str(request.priority)),
                sizes=self.request_sizes.labels(*m), running=self.running.labels(m[0]),
                duration=self.request_duration.labels(*m), response_sizes=self.response_sizes.labels(*m),
                server_errors=self.request_errors.labels(*m, "ModelServerError"),
                input_tokens=self.input_tokens.labels(*m), output_tokens=self.output_tokens.labels(*m),
                ntpot=self.ntpot.labels(*m), cached_tokens=self.cached_tokens.labels(*m))
            if len(self._series_cache) < 4 * MAX_MODEL_LABELS:
                self._series_cache[key] = series
        return series

    def routed(self, request: InferenceRequest, endpoint: Endpoint, schedule_seconds: float) -> None:
        s = request.attributes[_SERIES_KEY] = self._series(request)  # the end updates the same series
        if self._provisional:
            for name in {request.model, request.target_model}:
                if name in self._provisional:
                    self._provisional[name] += 1
        s.total.inc()
        s.sizes.observe(len(request.raw_body))
        s.running.inc()
        self.scheduler_e2e.observe(schedule_seconds)
        self._attempts_success.inc()
        decisions = self._decisions.get(endpoint.name)
        if decisions is None:
            decisions = self._decisions[endpoint.name] = self.decisions.labels(endpoint.name)
        decisions.inc()

    def disaggregated(self, decision: str, prefill: Endpoint | None) -> None:
        self.pd_decisions.labels(decision).inc()
        if prefill is not None:
            self.prefill_decisions.labels(prefill.name).inc()

    def known_model_label(self, name: str) -> str:
        """The label for a model name without taking a provisional slot (for requests that may never reach a
        server, so that nothing would settle the slot): the name when it already has series, else ``other``."""
        return name if not name or name in self._models or name in self._provisional else "other"

    def rejected(self, request: InferenceRequest | None, err: EppError) -> None:
        # no provisional slot for a request that never reaches a server: nothing would settle it
        m = ("", "") if request is None else (self.known_model_label(request.model),
                                              self.known_model_label(request.target_model))
        self.request_errors.labels(*m, _ERROR_CODES.get(err.status, "Unknown")).inc()
        self.rejections.labels(err.reason, str(err.status)).inc()
        if err.reason == "scheduling-failed":
            self.scheduler_attempts.labels("failure").inc()

    def completed(self, request: InferenceRequest, status: int, seconds: float, response_bytes: int,
                  prompt: int | None, output: int | None, cached: int | None) -> None:
        s = request.attributes.get(_SERIES_KEY) or self._series(request)
        s.running.dec()
        s.duration.observe(seconds)
        s.response_sizes.observe(response_bytes)
        if status >= 400 or status == 0:
            s.server_errors.inc()
        if prompt is not None:
            s.input_tokens.observe(prompt)
        if output is not None:
            s.output_tokens.observe(output)
            if output > 0:
                s.ntpot.observe(seconds / output)
        if cached is not None:
            s.cached_tokens.observe(cached)
        if self._provisional:
            self._settle(request, 200 <= status < 400)
