"""``epp replay``: a recorded request trace through EPP's scheduler and plugins, against simulated pods, in
virtual time: two configurations compared on yesterday's traffic in seconds.

    epp replay trace.jsonl --config-name epp-default --config-name gie-default
    epp replay trace.jsonl --config-file a.yaml --config-file b.yaml --pods 8 --tokenizer deepseek

Each configuration gets fresh pods and a fresh EPP (``Director``, ``load_config``: EPP's own code, the plugins
the configuration names) and the same arrivals (epp/trace.py: how to record a trace). The pods are the
simulator's engines (sim/engine.py, sim/kv_cache.py: its step-time model, paged prefix cache and scheduler),
without HTTP (sim/offline.py), on an event loop whose clock jumps to the next timer: a step costs what planning
it costs, not its modelled duration, and ``epp.clock`` gives the plugins the same time. What EPP learns from,
it gets as live: scraped metrics every ``--refresh-metrics-interval`` (waiting, running, KV usage, cache
configuration, as the pods' ``/metrics`` report them), response headers when a stream opens, a body chunk at
the first token, the usage (prompt, completion and cached tokens) at the end, exactly when the pod produces
them. Not modelled: EPP's and the proxy's own CPU time and latency (live, with every streamed token through
ext_proc, that is most of what separates configurations whose routing is alike; bench/README.md), P/D
transfers, KV events (precise prefix), remote scorers, sleep/wake. Requests arrive at their recorded times
whatever the answers (a multi-turn client would have waited for its previous answer).

Per configuration: TTFT (arrival to first token; streams only, as bench.quality measures it) and end-to-end
percentiles, the pods' prefix-cache hit rate, load balance (requests and busy time of the most loaded pod over
the mean; requests waiting in the pods), refusals, and what predicting plugins predicted against what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epp import clock
from epp.api.errors import EppError
from epp.api.parsing import parse_request
from epp.api.types import InferenceRequest, Usage
from epp.config import Config, parse_duration
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.engines import Extracted
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Decision, Director
from epp.extproc import protocol as p
from epp.observability.audit import plugin_audits
from epp.scheduling.config import BUILTIN_CONFIGS, load_config
from epp.scheduling.plugins import ResponseInfo
from epp.trace import TraceRecord, read_trace
from epp_sim.apis.base import Pod
from epp_sim.config import SimConfig
from epp_sim.engine import SimRequest
from epp_sim.errors import ApiError
from epp_sim.offline import VirtualTimeLoop, offline_pod, render
from epp_sim.tokenizer import Tokenizer, load_tokenizer

# What body observers see: a chunk when the first token is out and one at the end. EPP gets the usage parsed
# (``ResponseInfo.usage``), so the bytes are not the API's.
_FIRST_CHUNK = b'data: {"replay":"first token"}\n\n'
_LAST_CHUNK = b"data: [DONE]\n\n"
_SAMPLE_EVERY = 0.5  # s between samples of the pods' queues (as bench.quality samples them)
# Objects allocated between collections of the youngest generation while replaying (Python's default: 700): a
# replay allocates prompt-sized lists by the thousand, which mostly die young, uncollected at this threshold.
_GC_YOUNG = 20_000
SIM_PROFILE = "pressure"  # the pods when neither the trace nor the flags describe them: the pressure suite's


@dataclass
class ReplayOptions:
    pods: int = 8
    sim: SimConfig = field(default_factory=lambda: SimConfig(profile=SIM_PROFILE))
    refresh_interval: float = Config.refresh_metrics_interval  # EPP's --refresh-metrics-interval
    warmup: float = 0.0  # s of arrivals left out of the statistics (the pods' counters are read from then)
    drain: float = 60.0  # s after the last arrival before unfinished requests are cancelled (errors)
    seed: int = 1  # scrape phases and pickers' tie-breaks
    max_json_depth: int = Config.max_json_depth


@dataclass
class Outcome:
    """One request of the trace as the replay answered it."""

    t: float  # arrival, s from the first request
    endpoint: str = ""
    status: int = 0
    reason: str = ""  # EPP's refusal or the pod's error
    ttft: float | None = None  # s, streams only
    e2e: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class ConfigResult:
    name: str
    outcomes: list[Outcome]
    hits: int  # prefix-cache hit tokens over the measured window, all pods
    queries: int
    busy_s: dict[str, float]  # per pod, over the measured window
    waiting_mean: float
    audits: dict[str, dict[str, Any]]
    wall_s: float
    virtual_s: float
    warmup: float = 0.0

    def measured(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.t >= self.warmup]

    def summary(self) -> dict[str, Any]:
        meas = self.measured()
        ok = [o for o in meas if o.ok]
        ttft = [o.ttft for o in ok if o.ttft is not None]
        e2e = [o.e2e for o in ok if o.e2e is not None]
        picks: dict[str, int] = dict.fromkeys(self.busy_s, 0)
        for o in ok:
            picks[o.endpoint] = picks.get(o.endpoint, 0) + 1
        busy = list(self.busy_s.values())
        shed = [o for o in meas if o.status in (429, 503) and not o.endpoint]
        return {
            "config": self.name, "requests": len(self.outcomes), "measured": len(meas), "ok": len(ok),
            "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
            "e2e_p50": percentile(e2e, 50), "e2e_p99": percentile(e2e, 99),
            "hit_rate": self.hits / self.queries if self.queries else None,
            "picks": picks, "picks_max_over_mean": _max_over_mean(list(picks.values())),
            "busy_max_over_mean": _max_over_mean(busy), "waiting_mean": self.waiting_mean,
            "shed_pct": 100 * len(shed) / len(meas) if meas else 0.0,
            "error_pct": 100 * (len(meas) - len(ok) - len(shed)) / len(meas) if meas else 0.0,
            "audits": self.audits, "wall_s": round(self.wall_s, 2), "virtual_s": round(self.virtual_s, 1),
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (as bench/report.py's ``pct``)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else None


def scrape(pod: Pod) -> Extracted:
    """What EPP's scraper extracts from the pod's /metrics page (sim/metrics.py -> epp.datalayer.engines' vLLM
    families), read from the engine directly: rendering and parsing the page 20 times a second per pod would
    cost more than the routing being replayed."""
    e = pod.engine
    e.sync()
    p_ = e.rc.profile
    return Extracted(waiting_requests=len(e.waiting), running_requests=len(e.running), kv_cache_usage=e.kv.usage,
                     block_size=p_.block_size, num_gpu_blocks=p_.num_gpu_blocks, sleeping=e.sleep_level > 0,
                     served_model=e.rc.model_label)


class _Run:
    """One configuration over the trace, inside a running VirtualTimeLoop."""

    def __init__(self, name: str, config_text: str, trace: list[TraceRecord], opts: ReplayOptions,
                 tokenizer: Tokenizer) -> None:
        self.name = name
        self.trace = trace
        self.opts = opts
        rc = opts.sim.resolved()
        self.pods = [offline_pod(rc, tokenizer, i) for i in range(opts.pods)]
        self.pool = EndpointPool("replay")
        self.pool.sync(EndpointSpec(f"pod-{i}", f"10.0.{i // 250}.{i % 250 + 1}", 8000) for i in range(opts.pods))
        self.by_name = {e.name: pod for e, pod in zip(self.pool.endpoints, self.pods, strict=True)}
        self.config = load_config(config_text, self.pool)
        rng = random.Random(opts.seed)
        for plugin in self.config.plugins.values():  # pickers' tie-breaks: the same draws on every replay
            if isinstance(getattr(plugin, "rng", None), random.Random):
                plugin.rng.seed(rng.random())
        self.rng = rng
        self.director = Director(self.pool, self.config)
        self.outcomes: list[Outcome] = [Outcome(r.t - trace[0].t) for r in trace] if trace else []
        self.waiting: list[int] = []
        self.counters0: tuple[int, int, list[float]] | None = None
        self.scrapes: dict[str, asyncio.TimerHandle] = {}

    def _counters(self) -> tuple[int, int, list[float]]:
        for pod in self.pods:
            pod.engine.sync()
        stats = [pod.engine.stats for pod in self.pods]
        return (sum(s.prefix_hits for s in stats), sum(s.prefix_queries for s in stats),
                [pod.engine.busy_s for pod in self.pods])

    def _scrape(self, ep: Endpoint, pod: Pod) -> None:
        """EPP's scraper (epp.datalayer.scraper) reading one pod, then again an interval later (a timer rather
        than a task's sleep: it runs 20 times a second per pod)."""
        loop = asyncio.get_running_loop()
        scrape(pod).apply(ep.metrics)
        ep.metrics.inflight_tokens_at_scrape = ep.inflight_tokens
        ep.metrics.inflight_requests_at_scrape = ep.inflight_requests
        ep.metrics.updated_at = loop.time()
        self.scrapes[ep.name] = loop.call_later(self.opts.refresh_interval, self._scrape, ep, pod)

    async def _sample_loop(self) -> None:
        while True:
            self.waiting.append(sum(len(pod.engine.waiting) for pod in self.pods))
            await asyncio.sleep(_SAMPLE_EVERY)

    async def run(self) -> ConfigResult:
        loop = asyncio.get_running_loop()
        wall0 = time.perf_counter()
        start = loop.time()
        for pod in self.pods:
            pod.engine.start()
        for e in self.pool.endpoints:  # random phases, then every interval
            self.scrapes[e.name] = loop.call_later(self.rng.uniform(0, self.opts.refresh_interval), self._scrape,
                                                   e, self.by_name[e.name])
        side = [asyncio.create_task(self._sample_loop())]
        tasks: list[asyncio.Task[None]] = []
        t0 = self.trace[0].t if self.trace else 0.0
        warmup_at = start + self.opts.warmup
        for i, rec in enumerate(self.trace):
            at = start + rec.t - t0
            if self.counters0 is None and at >= warmup_at:
                await asyncio.sleep(warmup_at - loop.time())
                self.counters0 = self._counters()
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._serve(i, rec)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.opts.drain)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in side:
            t.cancel()
        for h in self.scrapes.values():
            h.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        c0 = self.counters0 or (0, 0, [0.0] * len(self.pods))
        c1 = self._counters()
        for pod in self.pods:
            await pod.engine.stop()
        for plugin in self.config.plugins.values():
            plugin.stop()
        measured = self.waiting[int(self.opts.warmup / _SAMPLE_EVERY):] or self.waiting
        return ConfigResult(
            self.name, self.outcomes, c1[0] - c0[0], c1[1] - c0[1],
            {e.name: b1 - b0 for e, b0, b1 in zip(self.pool.endpoints, c0[2], c1[2], strict=True)},
            sum(measured) / len(measured) if measured else 0.0,
            {k: a.summary() for k, a in plugin_audits(self.config).items()},
            time.perf_counter() - wall0, loop.time() - start, self.opts.warmup)

    def _request(self, i: int, rec: TraceRecord) -> InferenceRequest | None:
        """The request as the ext_proc stream builds it (epp/extproc/stream.py); None for one EPP refuses."""
        director = self.director
        headers = dict(rec.headers)
        headers.setdefault(":method", rec.method)
        headers.setdefault(":path", rec.path)
        path = rec.path
        route = director.model_path(path)
        if route is not None:
            path = route.path
        try:
            parsed = parse_request(path, rec.body, headers.get("content-type"), self.opts.max_json_depth,
                                   content_encoding=headers.get("content-encoding"))
        except EppError as e:
            director.rejected(None, e)
            self.outcomes[i].status, self.outcomes[i].reason = e.status, e.reason
            return None
        return InferenceRequest(
            request_id=headers.get(p.REQUEST_ID_HEADER) or f"replay-{i}", path=path, method=rec.method,
            headers=headers, body=parsed, raw_body=rec.body, target_model=director.target_model(parsed.model, None),
            priority=director.priority(None),
            fairness_id=p.first_header(headers, p.FAIRNESS_HEADERS) or "default-flow",
            received_at=clock.monotonic(), path_model=route.model if route else None)

    async def _serve(self, i: int, rec: TraceRecord) -> None:
        out = self.outcomes[i]
        if rec.method.upper() != "POST":  # GET /v1/models and the like: nothing for the engines to do
            out.status, out.reason = 200, "not simulated"
            return
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        request = self._request(i, rec)
        if request is None:
            return
        director = self.director
        try:
            decision = await director.route(request, None)
        except EppError as e:
            director.rejected(request, e)
            out.status, out.reason = e.status, e.reason
            return
        out.endpoint = decision.primary.name
        response = ResponseInfo(served_endpoint=decision.primary.hostport)
        try:
            await self._answer(request, decision, response, arrival, out)
        finally:
            director.complete(request, decision, response)

    async def _answer(self, request: InferenceRequest, decision: Decision, response: ResponseInfo, arrival: float,
                      out: Outcome) -> None:
        """What the pod answers, fed to EPP's response hooks when the pod produces it."""
        director = self.director
        loop = asyncio.get_running_loop()
        pod = self.by_name[decision.primary.name]
        try:
            sub = render(pod, request.path, request.body.payload)
        except ApiError as e:
            response.status, response.content_type, response.completed = e.status, "application/json", True
            out.status, out.reason = e.status, e.message[:120]
            director.response_headers(request, decision, response)
            director.response_body(request, decision, b"{}", True)
            return
        stream = sub.stream and not sub.prefill_only
        reqs: list[SimRequest] = [
            pod.engine.submit(prompt, n, stream=stream and k == 0, lora=sub.lora, cache_salt=sub.cache_salt,
                              prefill_only=sub.prefill_only, explicit_max=sub.explicit)
            for k, (prompt, n) in enumerate(zip(sub.prompts, sub.max_tokens, strict=True))]
        response.status = 200
        response.content_type = "text/event-stream" if stream else "application/json"
        if stream:  # the handler opens the stream (headers out) before the engine has done anything
            director.response_headers(request, decision, response)
        try:
            if stream:
                first = reqs[0]
                await first.wait(0)
                first.stream = False  # woken again at its end only, not at every token
                if first.num_output:
                    out.ttft = loop.time() - arrival
                    self._body(request, decision, response, _FIRST_CHUNK, False)
            for r in reqs:
                while not r.finished:
                    await r.wait(r.max_tokens)
        finally:
            for r in reqs:
                pod.engine.abort(r)  # a no-op once finished; the drain's end cancels the rest
        out.e2e = loop.time() - arrival
        if any(r.finish_reason == "abort" for r in reqs):
            out.status, out.reason = 503, "aborted"
            return
        out.status = 200
        out.prompt_tokens = sum(r.num_prompt for r in reqs)
        out.cached_tokens = sum(r.cached_tokens or 0 for r in reqs)
        if sub.usage:
            response.usage = Usage(out.prompt_tokens, sum(r.num_output for r in reqs),
                                   out.cached_tokens if sub.cached else None)
        if not stream:
            director.response_headers(request, decision, response)
        response.completed, response.outcome = True, "completed"
        self._body(request, decision, response, _LAST_CHUNK if stream else b"{}", True)

    def _body(self, request: InferenceRequest, decision: Decision, response: ResponseInfo, chunk: bytes,
              eos: bool) -> None:
        if response.first_byte_at is None:
            response.first_byte_at = clock.monotonic()
        response.bytes += len(chunk)
        self.director.response_body(request, decision, chunk, eos)


def replay_config(name: str, config_text: str, trace: list[TraceRecord], opts: ReplayOptions,
                  tokenizer: Tokenizer | None = None) -> ConfigResult:
    """One configuration over the trace, on a fresh virtual-time loop (blocking; not from a running loop)."""
    tok = tokenizer or load_tokenizer(opts.sim.tokenizer, opts.sim.vocab_size)
    loop = VirtualTimeLoop()
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], _GC_YOUNG), *threshold[1:])
    try:
        with clock.use(loop.time):
            return loop.run_until_complete(_Run(name, config_text, trace, opts, tok).run())
    finally:
        gc.set_threshold(*threshold)
        loop.close()


# What forked worker processes inherit (a trace is hundreds of MB: never pickled): the trace, the options and the
# tokenizer, whose cache of long segments holds most of the trace's tokenization, done once before they fork.
_SHARED: tuple[list[TraceRecord], ReplayOptions, Tokenizer] | None = None
_PARALLELISM = "TOKENIZERS_PARALLELISM"


def _replay_in_worker(item: tuple[str, str]) -> ConfigResult:
    assert _SHARED is not None
    trace, opts, tokenizer = _SHARED
    return replay_config(item[0], item[1], trace, opts, tokenizer)


def replay_configs(configs: Sequence[tuple[str, str]], trace: list[TraceRecord], opts: ReplayOptions,
                   jobs: int = 1) -> Iterator[ConfigResult]:
    """Each (name, YAML text) over the trace, ``jobs`` at a time in forked processes (1: in this one), in order."""
    global _SHARED
    tokenizer = load_tokenizer(opts.sim.tokenizer, opts.sim.vocab_size)
    warm_tokenizer(trace, opts, tokenizer)
    _SHARED = (trace, opts, tokenizer)
    try:
        if jobs <= 1 or len(configs) <= 1:
            for item in configs:
                yield _replay_in_worker(item)
            return
        # The workers tokenise little, on one thread; and HF tokenizers warns in a process forked after its
        # threads ran unless TOKENIZERS_PARALLELISM is set.
        saved = os.environ.get(_PARALLELISM)
        os.environ[_PARALLELISM] = "false"
        try:
            pool = multiprocessing.get_context("fork").Pool(min(jobs, len(configs)))
        finally:
            if saved is None:
                del os.environ[_PARALLELISM]
            else:
                os.environ[_PARALLELISM] = saved
        with pool:
            yield from pool.imap(_replay_in_worker, configs)
    finally:
        _SHARED = None


class _SegmentNotes:
    """A tokenizer that notes the prompt segments it is asked for (each once), and tokenises nothing."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.output_vocab = tokenizer.output_vocab
        self.segments: dict[str, None] = {}

    def encode(self, text: str) -> list[int]:
        return []

    def encode_segments(self, segments: list[str]) -> list[int]:
        self.segments.update(dict.fromkeys(segments))
        return []

    def decode(self, ids: list[int]) -> str:
        return ""

    def cache_segments(self, segments: Iterable[str]) -> None:
        pass


def warm_tokenizer(trace: list[TraceRecord], opts: ReplayOptions, tokenizer: Tokenizer) -> None:
    """Tokenise the long prompt segments (system prompts, earlier turns, ...) of every request at once, as the
    pods' tokenizer caches them: each request rendered as a pod renders it, its segments tokenised in batches."""
    notes = _SegmentNotes(tokenizer)
    pod = offline_pod(opts.sim.resolved(), notes, 0)
    for rec in trace:
        if rec.method.upper() != "POST":
            continue
        with contextlib.suppress(ValueError, ApiError):
            render(pod, rec.path, json.loads(rec.body))
    tokenizer.cache_segments(notes.segments)


# -- command line -------------------------------------------------------------------------------------------
class _ConfigAction(argparse.Action):
    """--config-name / --config-file in the order given, into one list."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: Any,
                 option: str | None = None) -> None:
        getattr(ns, self.dest).append((option, value))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="epp replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", nargs="+", help="trace file(s), JSON lines (epp/trace.py); several are merged by time")
    ap.add_argument("--config-name", dest="configs", action=_ConfigAction, default=[], choices=list(BUILTIN_CONFIGS),
                    help="a built-in EndpointPickerConfig to replay (repeatable, with --config-file)")
    ap.add_argument("--config-file", dest="configs", action=_ConfigAction,
                    help="an EndpointPickerConfig YAML file to replay (repeatable)")
    pods = ap.add_argument_group("pods (default: the trace's \"sim\" description, else the pressure suite's pods)")
    pods.add_argument("--pods", type=int)
    pods.add_argument("--sim-profile", help="sim/profiles.py: instant, fast, realistic, pressure")
    pods.add_argument("--num-gpu-blocks", type=int)
    pods.add_argument("--max-num-seqs", type=int)
    pods.add_argument("--tokenizer", help="the pods' tokenizer (deepseek, a tokenizer.json; none: pseudo)")
    pods.add_argument("--model", help="the pods' served model name")
    ap.add_argument("--refresh-metrics-interval", type=parse_duration, default=ReplayOptions.refresh_interval,
                    help="EPP's scrape interval (default 50ms)")
    ap.add_argument("--warmup", type=float, default=ReplayOptions.warmup,
                    help="seconds of arrivals left out of the statistics")
    ap.add_argument("--drain", type=float, default=ReplayOptions.drain,
                    help="virtual seconds after the last arrival before unfinished requests count as errors")
    ap.add_argument("--duration", type=float, help="replay only the first this many seconds of the trace")
    ap.add_argument("--seed", type=int, default=ReplayOptions.seed)
    ap.add_argument("--jobs", type=int, help="configurations replayed at once, each in its own process "
                                             "(default: one per configuration, up to the CPU count)")
    ap.add_argument("--json", type=Path, help="write every configuration's summary and requests here")
    return ap


def options_from(ns: argparse.Namespace, meta: dict[str, Any]) -> ReplayOptions:
    hint = meta.get("sim") or {}

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else hint.get(key, default)

    tokenizer = pick(ns.tokenizer, "tokenizer", None)
    sim = SimConfig(profile=pick(ns.sim_profile, "profile", SIM_PROFILE),
                    num_gpu_blocks=pick(ns.num_gpu_blocks, "num_gpu_blocks", None),
                    max_num_seqs=pick(ns.max_num_seqs, "max_num_seqs", None),
                    tokenizer=None if tokenizer in (None, "", "none", "pseudo") else tokenizer,
                    model=pick(ns.model, "model", SimConfig().model), seed=pick(None, "seed", 0))
    return ReplayOptions(pods=pick(ns.pods, "pods", ReplayOptions.pods), sim=sim,
                         refresh_interval=ns.refresh_metrics_interval, warmup=ns.warmup, drain=ns.drain, seed=ns.seed)


def _fmt(v: float | None, scale: float = 1.0, digits: int = 0, suffix: str = "") -> str:
    return "-" if v is None else f"{v * scale:,.{digits}f}{suffix}"


def _audit_cell(audits: dict[str, dict[str, Any]]) -> str:
    for a in audits.values():
        if a.get("unit") == "seconds" and a.get("count"):
            return f"{_fmt(a['predicted_over_actual'], digits=2)}x, |err| {_fmt(a['mean_abs_error'], 1000)} ms"
    return "-"


HEADER = ["config", "reqs", "TTFT p50", "p90", "p99", "e2e p50", "p99", "hit %", "picks max/mean",
          "busy max/mean", "queue", "shed %", "err %", "pred/seen TTFT", "wall"]


def table(summaries: list[dict[str, Any]]) -> str:
    rows = [[s["config"], str(s["measured"]), _fmt(s["ttft_p50"], 1000, suffix=" ms"),
             _fmt(s["ttft_p90"], 1000, suffix=" ms"), _fmt(s["ttft_p99"], 1000, suffix=" ms"),
             _fmt(s["e2e_p50"], digits=2, suffix=" s"), _fmt(s["e2e_p99"], digits=2, suffix=" s"),
             _fmt(s["hit_rate"], 100, 1), _fmt(s["picks_max_over_mean"], digits=2),
             _fmt(s["busy_max_over_mean"], digits=2), _fmt(s["waiting_mean"], digits=1), _fmt(s["shed_pct"], digits=1),
             _fmt(s["error_pct"], digits=1), _audit_cell(s["audits"]), f"{s['wall_s']:.1f} s"] for s in summaries]
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def ranking(summaries: list[dict[str, Any]], key: str = "ttft_p90") -> list[str]:
    """Configuration names, best (lowest ``key``) first; those with no value last."""
    return [s["config"] for s in sorted(summaries, key=lambda s: (s[key] is None, s[key] or 0.0))]


TIE = 0.05  # as bench.quality's verdicts: within 5% is a tie


def ranking_line(summaries: list[dict[str, Any]], key: str = "ttft_p90") -> str:
    """``a (40 ms) < b (90 ms) = c (92 ms)``: ``=`` where the next one is within ``TIE`` of the previous."""
    by = {s["config"]: s for s in summaries}
    out, prev = "", None
    for name in ranking(summaries, key):
        v = by[name][key]
        if prev is not None:
            out += " = " if v is not None and prev is not None and v <= prev * (1 + TIE) else " < "
        out += f"{name} ({_fmt(v, 1000, suffix=' ms')})"
        prev = v
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    ns = ap.parse_args(argv)
    if not ns.configs:
        ap.error("name at least one configuration: --config-name or --config-file (repeatable)")
    try:
        trace, meta = read_trace(ns.trace)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if ns.duration is not None and trace:
        trace = [r for r in trace if r.t - trace[0].t < ns.duration]
    if not trace:
        ap.error("the trace has no requests")
    opts = options_from(ns, meta)
    configs: list[tuple[str, str]] = []
    for option, value in ns.configs:
        if option == "--config-name":
            configs.append((value, BUILTIN_CONFIGS[value]))
        else:
            try:
                configs.append((Path(value).stem, Path(value).read_text()))
            except OSError as e:
                ap.error(f"--config-file {value}: {e}")
    s = opts.sim
    print(f"replaying {len(trace)} requests ({trace[-1].t - trace[0].t:.0f} s) on {opts.pods} pods "
          f"(profile {s.profile}, KV blocks {s.num_gpu_blocks or 'default'}, max_num_seqs {s.max_num_seqs or 'default'}"
          f", tokenizer {s.tokenizer or 'pseudo'})", flush=True)
    jobs = ns.jobs if ns.jobs is not None else min(len(configs), os.cpu_count() or 1)
    results = []
    for r in replay_configs(configs, trace, opts, jobs):
        results.append(r)
        print(f"  {r.name}: {r.wall_s:.1f} s", flush=True)
    summaries = [r.summary() for r in results]
    print()
    print(table(summaries))
    print()
    print("TTFT p90, best first: " + ranking_line(summaries))
    print("TTFT p99, best first: " + ranking_line(summaries, "ttft_p99"))
    if ns.json:
        ns.json.write_text(json.dumps({"trace": [str(t) for t in ns.trace], "meta": meta,
                                       "options": {**asdict(opts), "sim": asdict(opts.sim)},
                                       "summaries": summaries,
                                       "requests": {r.name: [asdict(o) for o in r.outcomes] for r in results}},
                                      indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
