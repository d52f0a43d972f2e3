"""Soak: a bounded, sustained load through Envoy + EPP + simulated pods, checking that nothing is lost
and that EPP's memory, file descriptors and threads stay flat.

    python -m bench.soak                       # 10 minutes, 16 concurrent clients
    python -m bench.soak --duration 60 --concurrency 32 --json soak.json

The mix exercises every path EPP has: non-streaming and streaming OpenAI chat, completions, Anthropic
messages (SSE), embeddings, header-only GETs, malformed bodies (EPP answers 400 itself) and clients that
hang up mid-stream. Every request gets exactly one outcome on the client side (ok, expected error,
abandoned on purpose, or error), and at the end these are reconciled with EPP's own counters: requests
routed and requests refused must match what the clients sent, every in-flight count must be back at 0.

EPP's resident memory, open file descriptors and threads are read from /proc/<pid>/status and
/proc/<pid>/fd every few seconds. Growth is measured from the end of the warm-up (the first 20% of the
run, at most 60 s: allocator arenas, caches and the prefix index fill up first) to the end, and as a
least-squares slope over the samples after the warm-up.

The module also holds the helpers the fault and security tests use to read EPP's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "demo-model"
SIM_ARGS = ["--profile", "instant", "--model", MODEL]

# -- reading EPP ---------------------------------------------------------------------------------------


def read_metrics(metrics_port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[str, list[tuple]]:
    """EPP's /metrics as {sample name: [(labels dict, value), ...]}."""
    text = httpx.get(f"http://{host}:{metrics_port}/metrics", timeout=timeout).text
    out: dict[str, list[tuple]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metric_sum(metrics: dict[str, list[tuple]], name: str, **labels: str) -> float:
    return sum(v for lab, v in metrics.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def inflight(metrics_port: int) -> dict[str, float]:
    """``epp_endpoint_inflight_requests`` per endpoint."""
    return {lab["endpoint"]: v for lab, v in read_metrics(metrics_port).get("epp_endpoint_inflight_requests", [])}


def wait_quiet(metrics_port: int, timeout: float = 30.0) -> dict[str, float]:
    """Wait until EPP counts no request in flight on any endpoint and no open ext_proc stream. Returns the
    last in-flight view (all zero) or raises AssertionError with what is still counted."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        m = read_metrics(metrics_port)
        per_endpoint = {lab["endpoint"]: v for lab, v in m.get("epp_endpoint_inflight_requests", [])}
        streams = metric_sum(m, "epp_extproc_streams")
        running = metric_sum(m, "inference_objective_running_requests")
        last = {"inflight": per_endpoint, "streams": streams, "running": running}
        if not any(per_endpoint.values()) and streams == 0 and running == 0:
            return per_endpoint
        time.sleep(0.2)
    raise AssertionError(f"EPP still counts requests in flight after {timeout}s: {last}")


@dataclass
class ProcStats:
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float  # user + system CPU seconds so far

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def proc_stats(pid: int) -> ProcStats:
    """Resident memory, open file descriptors and threads of a process, from /proc (Linux)."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()  # fields after the command name
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)
    return ProcStats(rss_kib=int(fields["VmRSS"].split()[0]), fds=len(os.listdir(f"/proc/{pid}/fd")),
                     threads=int(fields["Threads"]), cpu_s=cpu)


# -- the load --------------------------------------------------------------------------------------------


def _chat(stream: bool, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8 if stream else 4,
                            "messages": [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": f"soak request {i % 50}: say something"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


# name -> weight. "bad" bodies are refused by EPP itself (400); "abandon" hangs up after the first event.
MIX = {"chat": 30, "chat-stream": 25, "completions": 10, "messages-stream": 10, "embeddings": 5, "models": 5,
       "bad": 10, "abandon": 5}


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    expected_error: int = 0  # EPP refused a malformed body with 400, as it must
    abandoned: int = 0  # the client hung up mid-stream on purpose
    errors: int = 0
    by_kind: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.ok + self.expected_error + self.abandoned

    @property
    def lost(self) -> int:
        """Requests with no outcome at all; must be 0 by construction (every request is tallied)."""
        return self.sent - self.answered - self.errors

    @property
    def routed(self) -> int:
        """Requests EPP should have routed: all but the malformed ones."""
        return self.sent - self.by_kind["bad"]

    def error(self, kind: str, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{kind}: {what}"[:300])


async def _one(client: httpx.AsyncClient, kind: str, i: int, tally: Tally) -> None:
    tally.sent += 1
    tally.by_kind[kind] += 1
    t0 = time.perf_counter()
    try:
        if kind == "chat":
            r = await client.post("/v1/chat/completions", json=_chat(False, i))
            good = r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        elif kind == "completions":
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": f"soak {i % 30}", "max_tokens": 4})
            good = r.status_code == 200 and "choices" in r.json()
        elif kind == "embeddings":
            r = await client.post("/v1/embeddings", json={"model": MODEL, "input": f"soak {i}"})
            good = r.status_code == 200 and r.json()["data"]
        elif kind == "models":
            r = await client.get("/v1/models")
            good = r.status_code == 200
        elif kind == "bad":
            r = await client.post("/v1/chat/completions", content=b'{"model": "' + MODEL.encode() + b'", "messages": [',
                                  headers={"content-type": "application/json"})
            if r.status_code == 400 and r.headers.get("x-epp-error-reason") == "invalid-json":
                tally.expected_error += 1
            else:
                tally.error(kind, f"{r.status_code} {r.text[:120]}")
            return
        elif kind in ("chat-stream", "messages-stream", "abandon"):
            path, body = ("/v1/messages", {"model": MODEL, "max_tokens": 8, "stream": True,
                                           "messages": [{"role": "user", "content": f"soak {i % 40}"}]}) \
                if kind == "messages-stream" else ("/v1/chat/completions", _chat(True, i))
            async with client.stream("POST", path, json=body) as r:
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if kind == "abandon" and line.startswith("data:"):
                        break  # leaving the block closes the connection mid-stream
            if kind == "abandon":
                if r.status_code == 200:
                    tally.abandoned += 1
                else:
                    tally.error(kind, f"status {r.status_code}")
                return
            end = "data: [DONE]" if kind == "chat-stream" else "event: message_stop"
            good = r.status_code == 200 and any(line.strip() == end for line in lines)
            r_text = "\n".join(lines[-3:])
            if not good:
                tally.error(kind, f"{r.status_code} {r_text[:200]}")
                return
            tally.ok += 1
            tally.latencies.append(time.perf_counter() - t0)
            return
        else:
            raise ValueError(kind)
        if good:
            tally.ok += 1
            tally.latencies.append(time.perf_counter() - t0)
        else:
            tally.error(kind, f"{r.status_code} {r.text[:200]}")
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        tally.error(kind, f"{type(e).__name__}: {e}")


async def _load(url: str, duration: float, concurrency: int, seed: int, tally: Tally,
                rate: float | None = None, mix: dict[str, float] | None = None) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*(mix or MIX).items(), strict=True)
    deadline = time.monotonic() + duration
    counter = iter(range(1 << 62))
    interval = concurrency / rate if rate else 0.0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                await _one(client, rng.choices(kinds, weights)[0], next(counter), tally)
                if interval:
                    await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    sent: int
    answered: int
    ok: int
    expected_errors: int
    abandoned: int
    errors: int
    lost: int
    by_kind: dict[str, int]
    error_samples: list[str]
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    epp_routed: float  # inference_objective_request_total, summed
    epp_refused: float  # epp_rejections_total, summed
    rss_start_mib: float
    rss_after_warmup_mib: float
    rss_end_mib: float
    rss_growth_after_warmup_mib: float
    rss_slope_mib_per_min: float
    fds_start: int
    fds_end: int
    threads_start: int
    threads_end: int
    epp_cpu_percent: float  # EPP's CPU use over the run, in % of one core
    tasks_start: float | None  # EPP's asyncio tasks (gauge epp_asyncio_tasks, when EPP exposes it)
    tasks_end: float | None
    # Blocks held by Python's allocator (gauge epp_python_allocated_blocks): flat while RSS grows means the
    # growth is outside Python objects (C extensions, allocator).
    py_blocks_after_warmup: float | None
    py_blocks_end: float | None
    inflight_end: dict[str, float]
    samples: list[tuple[float, float, int, int]]  # (seconds, rss MiB, fds, threads)

    @property
    def reconciled(self) -> bool:
        """Nothing lost: every client request has an outcome and EPP's counters agree with the clients'."""
        return self.lost == 0 and self.errors == 0 and not any(self.inflight_end.values())

    def lines(self) -> list[str]:
        return [
            f"soak: {self.duration_s:.0f}s at concurrency {self.concurrency}: {self.sent} requests sent, "
            f"{self.answered} answered ({self.ok} ok, {self.expected_errors} refused by EPP as expected, "
            f"{self.abandoned} abandoned by the client on purpose), {self.errors} errors, {self.lost} lost",
            f"  {self.requests_per_s:.0f} req/s, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms; "
            f"mix {dict(sorted(self.by_kind.items()))}",
            f"  EPP counted {self.epp_routed:.0f} routed + {self.epp_refused:.0f} refused "
            f"(clients: {self.sent - self.by_kind.get('bad', 0)} + {self.by_kind.get('bad', 0)})",
            f"  EPP RSS {self.rss_start_mib:.1f} MiB at start, {self.rss_after_warmup_mib:.1f} after warm-up, "
            f"{self.rss_end_mib:.1f} at end: {self.rss_growth_after_warmup_mib:+.1f} MiB after warm-up "
            f"({self.rss_slope_mib_per_min:+.2f} MiB/min)",
            f"  EPP busy: {self.epp_cpu_percent:.0f}% of one core; "
            f"open fds {self.fds_start} -> {self.fds_end}, threads {self.threads_start} -> {self.threads_end}, "
            f"asyncio tasks {_or_na(self.tasks_start)} -> {_or_na(self.tasks_end)}, "
            f"in flight at end {self.inflight_end}",
            f"  Python allocator blocks {_or_na(self.py_blocks_after_warmup)} after warm-up -> "
            f"{_or_na(self.py_blocks_end)} at end",
            *(f"  error: {e}" for e in self.error_samples[:5]),
        ]


def _gauge(metrics: dict[str, list[tuple]], name: str) -> float | None:
    return metric_sum(metrics, name) if name in metrics else None


def _or_na(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


async def soak(url: str, metrics_port: int, epp_pid: int, duration: float, concurrency: int = 16,
               seed: int = 1, sample_every: float = 5.0, rate: float | None = None,
               progress: bool = False, mix: dict[str, float] | None = None) -> SoakReport:
    """Run the load against a running stack and report. ``rate``: overall requests/s cap (None: as fast
    as ``concurrency`` clients go)."""
    tally = Tally()
    before = read_metrics(metrics_port)
    start = proc_stats(epp_pid)
    warmup = min(60.0, duration * 0.2)
    samples: list[tuple[float, float, int, int]] = [(0.0, start.rss_mib, start.fds, start.threads)]
    t0 = time.monotonic()
    load = asyncio.create_task(_load(url, duration, concurrency, seed, tally, rate, mix))
    py_blocks_after_warmup: float | None = None
    while not load.done():
        await asyncio.wait({load}, timeout=min(sample_every, max(0.1, duration / 10)))
        s = proc_stats(epp_pid)
        samples.append((time.monotonic() - t0, s.rss_mib, s.fds, s.threads))
        if py_blocks_after_warmup is None and samples[-1][0] >= warmup:
            py_blocks_after_warmup = _gauge(await asyncio.to_thread(read_metrics, metrics_port),
                                            "epp_python_allocated_blocks")
        if progress:
            print(f"  t={samples[-1][0]:5.0f}s sent={tally.sent} ok={tally.ok} err={tally.errors} "
                  f"rss={s.rss_mib:.1f}MiB fds={s.fds} threads={s.threads}", file=sys.stderr, flush=True)
    await load
    elapsed = time.monotonic() - t0
    quiet = await asyncio.to_thread(wait_quiet, metrics_port, 60.0)
    end = proc_stats(epp_pid)
    samples.append((time.monotonic() - t0, end.rss_mib, end.fds, end.threads))
    after = read_metrics(metrics_port)
    post = [(t, rss) for t, rss, _, _ in samples if t >= warmup]
    after_warmup = post[0][1] if post else start.rss_mib
    lat = sorted(tally.latencies) or [0.0]
    return SoakReport(
        duration_s=elapsed, concurrency=concurrency, sent=tally.sent, answered=tally.answered, ok=tally.ok,
        expected_errors=tally.expected_error, abandoned=tally.abandoned, errors=tally.errors, lost=tally.lost,
        by_kind=dict(tally.by_kind), error_samples=tally.error_samples, requests_per_s=tally.sent / elapsed,
        p50_ms=lat[len(lat) // 2] * 1000, p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        epp_routed=metric_sum(after, "inference_objective_request_total")
        - metric_sum(before, "inference_objective_request_total"),
        epp_refused=metric_sum(after, "epp_rejections_total") - metric_sum(before, "epp_rejections_total"),
        rss_start_mib=start.rss_mib, rss_after_warmup_mib=after_warmup, rss_end_mib=end.rss_mib,
        rss_growth_after_warmup_mib=end.rss_mib - after_warmup, rss_slope_mib_per_min=_slope(post) * 60,
        fds_start=start.fds, fds_end=end.fds, threads_start=start.threads, threads_end=end.threads,
        epp_cpu_percent=100 * (end.cpu_s - start.cpu_s) / max(1e-9, time.monotonic() - t0),
        tasks_start=_gauge(before, "epp_asyncio_tasks"), tasks_end=_gauge(after, "epp_asyncio_tasks"),
        py_blocks_after_warmup=py_blocks_after_warmup, py_blocks_end=_gauge(after, "epp_python_allocated_blocks"),
        inflight_end=quiet, samples=samples)


def _parse_mix(text: str) -> dict[str, float]:
    """``chat=3,abandon=1`` -> {"chat": 3.0, "abandon": 1.0}; kinds from MIX."""
    out: dict[str, float] = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in MIX:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} (known: {', '.join(MIX)})")
        try:
            out[kind] = float(weight or 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} is not a number: {weight!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    from epp.stack.local import LocalStack

    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--rate", type=float, default=None, help="cap on requests/s overall (default: no cap)")
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--upstream", default="original_dst", choices=["original_dst", "override_host"])
    ap.add_argument("--response-body-mode", default="FULL_DUPLEX_STREAMED", choices=["FULL_DUPLEX_STREAMED", "NONE"])
    ap.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                    help="fail when EPP's RSS grows more than this after the warm-up (default 64)")
    ap.add_argument("--mix", type=_parse_mix, default=None,
                    help="request kinds and weights, e.g. chat=3,abandon=1 (default: "
                         + ",".join(f"{k}={v}" for k, v in MIX.items()) + ")")
    ap.add_argument("--json", help="write the report (with the RSS samples) to this file")
    args = ap.parse_args(argv)

    with LocalStack(pods=args.pods, sim_args=SIM_ARGS, upstream=args.upstream,
                    response_body_mode=args.response_body_mode) as stack:
        assert stack.epp_pid is not None
        print(f"soak: {args.duration:.0f}s through {stack.url} (EPP pid {stack.epp_pid}, {args.pods} pods)",
              file=sys.stderr)
        report = asyncio.run(soak(stack.url, stack.metrics_port, stack.epp_pid, args.duration, args.concurrency,
                                  args.seed, rate=args.rate, progress=True, mix=args.mix))
    for line in report.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    routed_ok = report.epp_routed == report.sent - report.by_kind.get("bad", 0)
    refused_ok = report.epp_refused == report.by_kind.get("bad", 0)
    flat = report.rss_growth_after_warmup_mib <= args.max_rss_growth_mib
    verdict = report.reconciled and routed_ok and refused_ok and flat
    print("soak:", "PASS" if verdict else "FAIL",
          *(() if routed_ok and refused_ok else ("(EPP's counters disagree with the clients')",)),
          *(() if flat else (f"(RSS grew more than {args.max_rss_growth_mib} MiB)",)))
    return 0 if verdict else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
