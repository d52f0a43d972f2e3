"""Metrics-scraping cost: our selective parser vs prometheus_client's general parser.

    python -m bench.scrape_bench [--endpoints 100] [--interval 0.05] [--duration 5] [--rounds 3]

1. Parse micro-benchmark on a realistic vLLM ``/metrics`` page (µs per scrape).
2. End to end: N aiohttp servers on loopback in a *separate process* (their CPU is not counted) serve
   that page; ``MetricsScraper`` polls all of them every ``interval``; we report this process's CPU
   seconds per wall second (100% = one core) and the scrape rate achieved, per parser. The
   ``http-only`` row skips parsing (a canned result) to show the transport's share.

``run_bench(...)`` is importable for a CI smoke test with small numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import resource
import socket
import statistics
import sys
import time
import timeit
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from epp.datalayer import promtext
from epp.datalayer.engines import BUILTIN_ENGINES
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.datalayer.promtext import ParseResult, Sample
from epp.datalayer.scraper import MetricsScraper, Parser

# vLLM V1 bucket boundaries (vLLM's vllm/v1/metrics/loggers.py, as sim/stats.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40,
                80, 160, 640, 2560)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920,
                   7680)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def render_vllm_page(
    *,
    model: str = "meta-llama/Llama-3.1-8B-Instruct",
    waiting: int = 3,
    running: int = 7,
    kv_usage: float = 0.42,
    lora: bool = True,
    block_size: int = 16,
    num_gpu_blocks: int = 27865,
    seed: int = 0,
) -> str:
    """A vLLM V1 ``/metrics`` page as prometheus_client (which vLLM uses) renders it: ~200 lines with
    histograms, counters with ``_created``, info-style gauges and the process/GC collectors."""
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    GCCollector(registry=reg)
    PlatformCollector(registry=reg)
    lbl = ("model_name", "engine")
    key = {"model_name": model, "engine": "0"}
    Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lbl,
          registry=reg).labels(**key).set(running)
    Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lbl,
          registry=reg).labels(**key).set(waiting)
    Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lbl,
          registry=reg).labels(**key).set(kv_usage)
    if lora:
        g = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                  ("max_lora", "waiting_lora_adapters", "running_lora_adapters"), registry=reg)
        now = 1_700_000_000.0 + seed
        g.labels("4", "", "").set(now - 30)
        g.labels("4", "", "sql-lora").set(now - 20)
        g.labels("4", "tweet-lora", "sql-lora,chat-lora").set(now)
        g.labels("4", "", "chat-lora").set(now - 10)
    cache_cfg = {
        "block_size": str(block_size), "cache_dtype": "auto", "calculate_kv_scales": "False",
        "cpu_offload_gb": "0", "enable_prefix_caching": "True", "gpu_memory_utilization": "0.9",
        "is_attention_free": "False", "num_cpu_blocks": "None", "num_gpu_blocks": str(num_gpu_blocks),
        "num_gpu_blocks_override": "None", "prefix_caching_hash_algo": "sha256", "sliding_window": "None",
        "swap_space": "4", "swap_space_bytes": "4294967296", "engine": "0",
    }
    Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", tuple(cache_cfg),
          registry=reg).labels(**cache_cfg).set(1)
    for name, doc, v in (
        ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", 2),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", 912_345),
        ("vllm:generation_tokens", "Number of generation tokens processed.", 123_456),
        ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", 900_000),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", 512_000),
    ):
        Counter(name, doc, lbl, registry=reg).labels(**key).inc(v)
    success = Counter("vllm:request_success", "Count of successfully processed requests.",
                      (*lbl, "finished_reason"), registry=reg)
    for reason, v in (("stop", 1200), ("length", 33), ("abort", 4)):
        success.labels(**key, finished_reason=reason).inc(v)
    rnd = random.Random(seed)
    for name, doc, buckets, scale in (
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
         TTFT_BUCKETS, 0.2),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
         TPOT_BUCKETS, 0.03),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
         LATENCY_BUCKETS, 4.0),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
         LATENCY_BUCKETS, 0.5),
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS, 700),
        ("vllm:request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS, 200),
    ):
        h = Histogram(name, doc, lbl, buckets=buckets, registry=reg).labels(**key)
        for _ in range(50):
            h.observe(rnd.expovariate(1 / scale))
    return generate_latest(reg).decode()


VLLM_FAMILIES = BUILTIN_ENGINES["vllm"].families


def general_parse(text: str, families: Iterable[str]) -> ParseResult:
    """The same contract as ``promtext.parse`` (exact sample names), built on prometheus_client's
    general parser: the baseline we compare against, for correctness and for speed."""
    wanted = set(families)
    result = ParseResult()
    out = result.families
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in wanted:
                    ts = None if s.timestamp is None else round(float(s.timestamp) * 1000)
                    out.setdefault(s.name, []).append(Sample(s.name, dict(s.labels), float(s.value), ts))
    except Exception as e:  # it raises on the first bad line; keep what was read
        result.add_error(f"{type(e).__name__}: {e}")
    return result


# ------------------------------------------------------------------------------------ micro-benchmark


def parse_micro(page: str, *, number: int = 300) -> dict[str, float]:
    """µs per parse of ``page`` for the vLLM engine's families."""
    fams = VLLM_FAMILIES
    out = {}
    for label, fn in (("promtext", promtext.parse), ("prometheus_client", general_parse)):
        fn(page, fams)
        best = min(timeit.repeat(lambda fn=fn: fn(page, fams), number=number, repeat=5))
        out[label] = best / number * 1e6
    return out


# ------------------------------------------------------------------------------------ servers process


def _serve(n: int, conn: Any) -> None:
    """Child process: ``n`` aiohttp sites on loopback, each serving its own vLLM page."""
    from aiohttp import web

    async def main() -> None:
        pages = [render_vllm_page(waiting=i % 5, running=i % 9, kv_usage=(i % 10) / 10, seed=i).encode()
                 for i in range(n)]
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        runners = []
        ports = []
        for i in range(n):
            page = pages[i]

            async def handler(_req: web.Request, page: bytes = page) -> web.Response:
                return web.Response(body=page, headers=headers)

            app = web.Application()
            app.router.add_get("/metrics", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock, backlog=128).start()
            ports.append(sock.getsockname()[1])
            runners.append(runner)
        conn.send(ports)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the parent says stop
        for r in runners:
            await r.cleanup()

    asyncio.run(main())


class _Servers:
    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(n, child), daemon=True)

    def __enter__(self) -> list[int]:
        self.proc.start()
        if not self._conn.poll(60):
            self.proc.kill()
            raise RuntimeError("metrics servers did not start")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# ------------------------------------------------------------------------------------ end to end


async def _measure(ports: list[int], parser: Parser, interval: float, warmup: float, duration: float
                   ) -> dict[str, float]:
    pool = EndpointPool("bench")
    pool.sync([EndpointSpec(f"ep{i}", "127.0.0.1", p) for i, p in enumerate(ports)])
    scraper = MetricsScraper(pool, interval=interval, timeout=1.0, parser=parser)
    await scraper.start()
    try:
        await asyncio.sleep(warmup)
        s0 = {ep: (st.scrapes, st.errors) for ep, st in scraper.all_stats.items()}
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        await asyncio.sleep(duration)
        r1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        s1 = {ep: (st.scrapes, st.errors) for ep, st in scraper.all_stats.items()}
    finally:
        await scraper.stop()
    wall = w1 - w0
    scrapes = sum(s1[ep][0] - s0[ep][0] for ep in s1)
    errors = sum(s1[ep][1] - s0[ep][1] for ep in s1)
    return {
        "cpu_pct": (c1 - c0) / wall * 100,
        "user_pct": (r1.ru_utime - r0.ru_utime) / wall * 100,
        "sys_pct": (r1.ru_stime - r0.ru_stime) / wall * 100,
        "scrapes_per_s": scrapes / wall,
        "target_per_s": len(ports) / interval,
        "errors": errors,
        "cpu_us_per_scrape": (c1 - c0) / max(scrapes, 1) * 1e6,
    }


def run_bench(
    endpoints: int = 100,
    interval: float = 0.05,
    duration: float = 5.0,
    warmup: float = 1.0,
    *,
    rounds: int = 1,
    micro_number: int = 300,
) -> dict[str, Any]:
    """Returns ``{"page_lines", "page_bytes", "parse_us": {...}, "e2e": {mode: {...}}}``; with several
    ``rounds`` the modes are interleaved and each e2e figure is the median over rounds."""
    page = render_vllm_page()
    canned = promtext.parse(page, VLLM_FAMILIES)

    def http_only(_text: str, _fams: Iterable[str]) -> ParseResult:
        return canned

    result: dict[str, Any] = {
        "page_lines": page.count("\n"),
        "page_bytes": len(page.encode()),
        "parse_us": parse_micro(page, number=micro_number),
        "e2e": {},
    }
    modes: dict[str, Parser] = {"http-only": http_only, "promtext": promtext.parse,
                                "prometheus_client": general_parse}
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with _Servers(endpoints) as ports:
        for _ in range(max(1, rounds)):  # interleaved: slow drifts of the machine hit every mode alike
            for mode, parser in modes.items():
                runs[mode].append(asyncio.run(_measure(ports, parser, interval, warmup, duration)))
    result["e2e"] = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    return result


def _print(result: dict[str, Any], endpoints: int, interval: float) -> None:
    print(f"vLLM page: {result['page_lines']} lines, {result['page_bytes']} bytes; "
          f"families read: {', '.join(sorted(VLLM_FAMILIES))}")
    print()
    rate = endpoints / interval
    print(f"{'parser':<20}{'parse µs/scrape':>16}{'parse CPU% @' + f'{rate:.0f}/s':>22}")
    for name, us in result["parse_us"].items():
        print(f"{name:<20}{us:>16.1f}{us * rate / 1e4:>21.1f}%")
    print()
    print(f"end to end: {endpoints} endpoints every {interval * 1000:g} ms "
          f"(target {rate:.0f} scrapes/s), EPP process CPU (100% = one core), median of rounds")
    print(f"{'mode':<20}{'CPU %':>8}{'(user':>8}{'sys)':>7}{'scrapes/s':>12}{'CPU µs/scrape':>16}{'errors':>8}")
    for mode, r in result["e2e"].items():
        print(f"{mode:<20}{r['cpu_pct']:>8.1f}{r['user_pct']:>8.1f}{r['sys_pct']:>7.1f}{r['scrapes_per_s']:>12.0f}"
              f"{r['cpu_us_per_scrape']:>16.0f}{r['errors']:>8.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scrape_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = ap.parse_args(argv)
    result = run_bench(args.endpoints, args.interval, args.duration, args.warmup, rounds=args.rounds)
    _print(result, args.endpoints, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
