"""Scheduling cost per decision: the default configuration with long prompts, at 8 / 64 / 256 endpoints.

    python -m bench.scheduling_bench [--endpoints 8,64,256] [--prompt-tokens 8192] [--decisions 300]

Workload: 16 shared "system prompts" of 3/4 of the prompt, each request adding its own quarter, so the
prefix index holds real matches (the first part of every prompt is cached on some endpoints). Every
endpoint has fresh, different metrics. The index is warmed with ``4 x endpoints`` routed requests first.
For each configuration the table shows, per decision (µs): ``schedule`` = what ``Director.route`` times
(filters, scorers including hashing and matching, picker); ``hash`` = the prefix producer hashing the
prompt alone; ``match`` = matching those hashes against every endpoint's index; ``update`` = the
observers' ``pre_request`` + ``on_response_complete`` (index insertion, feedback).

Rows: ``text`` = a text prompt (character blocks, the GIE default); ``ids`` = the request carries token ids;
``text/512`` = text with ``maxPrefixBlocksToMatch: 512`` so that all 8k tokens are hashed (the default 256
blocks x 16 tokens covers 4096).

``run_bench(...)`` is importable for a CI smoke test with small numbers.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import string
import time
from collections.abc import Iterable
from typing import Any

from epp.api.types import ApiKind, InferenceRequest, ParsedBody, Usage
from epp.datalayer.endpoint import Endpoint
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.scheduling.config import DEFAULT_CONFIG, load_config
from epp.scheduling.plugins import RequestObserver, ResponseInfo
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer, PrefixCacheScorer

FULL_COVERAGE = DEFAULT_CONFIG.replace("- type: prefix-cache-scorer\n",
                                       "- type: prefix-cache-scorer\n  parameters: {maxPrefixBlocksToMatch: 512}\n")
VARIANTS = {"text": (DEFAULT_CONFIG, False), "ids": (DEFAULT_CONFIG, True), "text/512": (FULL_COVERAGE, False)}


def _pool(n: int, rng: random.Random) -> EndpointPool:
    pool = EndpointPool()
    pool.sync([EndpointSpec(f"pod-{i}-rank-0", f"10.{i // 250}.{i % 250}.1", 8000) for i in range(n)])
    now = time.monotonic()
    for e in pool.endpoints:
        m = e.metrics
        m.waiting_requests = rng.randrange(0, 20)
        m.running_requests = rng.randrange(0, 64)
        m.kv_cache_usage = rng.random()
        m.block_size, m.num_gpu_blocks = 16, 40_000
        m.updated_at = now
    return pool


class _Workload:
    def __init__(self, prompt_tokens: int, ids: bool, rng: random.Random, groups: int = 16) -> None:
        self.rng = rng
        self.ids = ids
        self.shared = prompt_tokens * 3 // 4
        self.own = prompt_tokens - self.shared
        if ids:
            self.prefixes: list[Any] = [[rng.randrange(100_000) for _ in range(self.shared)] for _ in range(groups)]
        else:
            letters = string.ascii_letters + "      "
            self.prefixes = ["".join(rng.choices(letters, k=self.shared * 4)) for _ in range(groups)]
        self.n = 0

    def request(self) -> InferenceRequest:
        self.n += 1
        rng = self.rng
        prefix = rng.choice(self.prefixes)
        if self.ids:
            body = ParsedBody(ApiKind.COMPLETIONS, model="m", prompt_token_ids=prefix + [
                rng.randrange(100_000) for _ in range(self.own)])
        else:
            body = ParsedBody(ApiKind.COMPLETIONS, model="m",
                              prompt_text=prefix + "".join(rng.choices(string.ascii_letters, k=self.own * 4)))
        return InferenceRequest(f"r{self.n}", "/v1/completions", "POST", {}, body, b"", target_model="m")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _prefix_producer(config: Any) -> ApproxPrefixCacheProducer:
    for p in config.plugins.values():
        if isinstance(p, PrefixCacheScorer):
            return p.prefix_producer()
        if isinstance(p, ApproxPrefixCacheProducer):
            return p
    raise RuntimeError("no prefix-cache plugin in the configuration")


def run_bench(endpoints: Iterable[int] = (8, 64, 256), prompt_tokens: int = 8192, decisions: int = 300,
              variants: Iterable[str] = tuple(VARIANTS), seed: int = 1) -> list[dict[str, Any]]:
    """One row per (variant, endpoint count): µs per decision (mean, p50, p99 of schedule; means of the parts)."""
    rows = []
    for variant in variants:
        config_text, ids = VARIANTS[variant]
        for n in endpoints:
            rng = random.Random(seed)
            pool = _pool(n, rng)
            config = load_config(config_text, pool)
            scheduler = config.scheduler
            observers = config.plugins_of(RequestObserver)
            producer = _prefix_producer(config)
            work = _Workload(prompt_tokens, ids, rng)
            candidates = list(pool.endpoints)
            ok = ResponseInfo(status=200, completed=True, usage=Usage(prompt_tokens, 1, 0))

            def decide(timings: dict[str, list[float]] | None, candidates: list[Endpoint] = candidates,
                       scheduler: Any = scheduler, observers: list[Any] = observers,
                       producer: ApproxPrefixCacheProducer = producer, work: _Workload = work,
                       ok: ResponseInfo = ok) -> None:
                req = work.request()
                t0 = time.perf_counter()
                result = scheduler.schedule(req, candidates)
                t1 = time.perf_counter()
                for o in observers:
                    o.pre_request(req, result)
                for o in observers:
                    o.on_response_complete(req, result.endpoints[0], ok)
                t2 = time.perf_counter()
                if timings is not None:
                    fresh = work.request()
                    h0 = time.perf_counter()
                    st = producer.state(fresh, candidates)
                    h1 = time.perf_counter()
                    producer.match_all(st, candidates)
                    h2 = time.perf_counter()
                    timings["schedule"].append(t1 - t0)
                    timings["update"].append(t2 - t1)
                    timings["hash"].append(h1 - h0)
                    timings["match"].append(h2 - h1)

            for _ in range(4 * n):
                decide(None)
            timings: dict[str, list[float]] = {"schedule": [], "hash": [], "match": [], "update": []}
            gc.collect()
            for _ in range(decisions):
                decide(timings)
            us = {k: [v * 1e6 for v in vals] for k, vals in timings.items()}
            rows.append({
                "variant": variant, "endpoints": n, "prompt_tokens": prompt_tokens, "decisions": decisions,
                "schedule_mean": statistics.fmean(us["schedule"]),
                "schedule_p50": _percentile(us["schedule"], 0.5), "schedule_p99": _percentile(us["schedule"], 0.99),
                "hash_mean": statistics.fmean(us["hash"]), "match_mean": statistics.fmean(us["match"]),
                "update_mean": statistics.fmean(us["update"]),
                "blocks": len(producer.state(work.request(), candidates).hashes),
                "index_blocks": producer.indexer_size(),
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'prompt':<9}{'endpoints':>10}{'blocks':>8}{'schedule mean':>15}{'p50':>9}{'p99':>9}"
            f"{'hash':>9}{'match':>9}{'update':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<9}{r['endpoints']:>10}{r['blocks']:>8}{r['schedule_mean']:>15.0f}"
                     f"{r['schedule_p50']:>9.0f}{r['schedule_p99']:>9.0f}{r['hash_mean']:>9.0f}"
                     f"{r['match_mean']:>9.0f}{r['update_mean']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoints", default="8,64,256", help="comma-separated endpoint counts")
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--decisions", type=int, default=300)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    args = ap.parse_args(argv)
    rows = run_bench([int(x) for x in args.endpoints.split(",")], args.prompt_tokens, args.decisions,
                     [v.strip() for v in args.variants.split(",")])
    print("EPP's default config (predicted-latency-scorer over the prefix-cache producer, max-score picker); "
          f"{args.prompt_tokens}-token prompts; µs per decision")
    print(format_table(rows))


if __name__ == "__main__":
    main()
