"""Routing quality: the same seeded open-loop workloads against several routers in front of the same pods.

    python -m bench.quality                 # the full run (~8 min on 2 cores), or: make bench
    python -m bench.quality --workloads shared-prefix --targets envoy-rr,epp-default --duration 12
    python -m bench.quality --suite pressure --pods 8 --seeds 1,2      # the outside evaluation's regimes

The pressure suite (bench/workloads.py PRESSURE; bench/README.md) runs 8 pods of the `pressure` profile with the
DeepSeek tokenizer, restarts them when a workload needs other pod settings (KV blocks, max_num_seqs), and prints
one table per workload (pooled over seeds) with a verdict line: EPP's default against the best peer router and
against round robin.

The simulated pods (``python -m epp_sim``, profile ``realistic`` with a smaller KV cache) start once and are
shared by every target; before each run they are waited for until idle and their prefix caches are reset
(``POST /sim/control {"reset_prefix_cache": true}``). For each workload the targets run one after another,
each freshly started and stopped after its run, so only the router under test uses CPU. Optional targets:
epp-precise (precise-prefix.yaml on the pods' KV events; in the pressure suite), epp-default-none
(response_body_mode NONE), vllm-router-power-of-two, vllm-router-consistent-hash.
Method, parameters and results: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.client import RunOutput, new_session, run_open_loop
from bench.harness import (
    KV_EVENT_TARGETS,
    PEERS,
    PRESSURE_TARGETS,
    TARGETS,
    CpuMeter,
    EnvoyEpp,
    SimPods,
    Target,
    make_targets,
)
from bench.report import fmt, markdown_table, pct, plot_quality, table

RESULTS = Path(__file__).parent / "results"


@dataclass
class QualityConfig:
    pods: int = 4
    sim_profile: str = "realistic"
    num_gpu_blocks: int = 4000  # 64k tokens of KV per pod (see README: why smaller than an H100's)
    sim_extra: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=lambda: list(wl.WORKLOADS))
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    rate: float = 14.0
    duration: float = 20.0  # seconds of arrivals per run, warm-up included
    warmup: float = 4.0  # requests scheduled before this are sent but left out of latency stats
    drain: float = 60.0  # after the last arrival, wait this long for answers, then cancel (errors)
    seed: int = 1
    workload_kw: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-workload size overrides
    out: Path | None = None
    plots: bool = True
    quiet: bool = False
    suite: str | None = None  # a key of workloads.SUITES: its workloads, each with its own rate and pod settings
    seeds: list[int] = field(default_factory=list)  # empty: [seed]
    rate_scale: float = 1.0  # suite mode: every workload's rate times this
    record_traces: Path | None = None  # EPP targets record their requests here (epp --record-trace), for replay
    tokenizer: str | None = None  # the pods' --tokenizer (suite mode: deepseek)


def suite_config(suite: str = "pressure", **kw: Any) -> QualityConfig:
    """A QualityConfig for a suite, with the suite's defaults (overridable by ``kw``)."""
    base: dict[str, Any] = dict(suite=suite, pods=8, sim_profile="pressure", num_gpu_blocks=2048, tokenizer="deepseek",
                                workloads=[w.name for w in wl.SUITES[suite]], targets=list(PRESSURE_TARGETS),
                                duration=PRESSURE_DURATION, warmup=PRESSURE_WARMUP, drain=60.0)
    base.update(kw)
    return QualityConfig(**base)


# Sized so that the whole suite (10 workloads x 6 targets x 2 seeds, 8 pods) takes ~45 min on 2 cores; see
# bench/README.md for the measured time per run.
PRESSURE_DURATION = 16.0
PRESSURE_WARMUP = 5.0


@dataclass
class Job:
    """One workload of a run: its name, rate and the pod settings it needs (pods restart when these change)."""

    workload: str
    rate: float
    num_gpu_blocks: int
    max_num_seqs: int | None = None
    duration: float | None = None

    @property
    def pod_key(self) -> tuple[int, int | None]:
        return self.num_gpu_blocks, self.max_num_seqs


def jobs(cfg: QualityConfig) -> list[Job]:
    if not cfg.suite:
        return [Job(w, cfg.rate, cfg.num_gpu_blocks) for w in cfg.workloads]
    specs = {w.name: w for w in wl.SUITES[cfg.suite]}
    unknown = [w for w in cfg.workloads if w not in specs]
    if unknown:
        raise ValueError(f"not in suite {cfg.suite}: {', '.join(unknown)} (known: {', '.join(specs)})")
    out = [Job(w, specs[w].rate * cfg.rate_scale, specs[w].num_gpu_blocks, specs[w].max_num_seqs,
               specs[w].duration if cfg.duration == PRESSURE_DURATION else None) for w in cfg.workloads]
    # Group by pod settings (first appearance first) so the pods restart as rarely as possible.
    order = list(dict.fromkeys(j.pod_key for j in out))
    return sorted(out, key=lambda j: order.index(j.pod_key))


def _sim_args(cfg: QualityConfig, job: Job | None = None) -> list[str]:
    blocks = job.num_gpu_blocks if job else cfg.num_gpu_blocks
    out = ["--profile", cfg.sim_profile, "--num-gpu-blocks", str(blocks), "--model", wl.MODEL]
    if job and job.max_num_seqs:
        out += ["--max-num-seqs", str(job.max_num_seqs)]
    if cfg.tokenizer:
        out += ["--tokenizer", cfg.tokenizer]
    return [*out, *cfg.sim_extra]


async def _sample_pods(pods: SimPods, http: Any, samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    """Twice a second: requests waiting and running, summed over pods (the queues round robin builds)."""
    while not stop.is_set():
        try:
            st = await pods.state(http)
            samples.append({"waiting": sum(s["waiting"] for s in st), "running": sum(s["running"] for s in st),
                            "kv": sum(s["kv_cache_usage"] for s in st) / len(st)})
        except Exception:
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(out: RunOutput, cfg: QualityConfig, c0: dict[str, float] | None, c1: dict[str, float],
              cpu: dict[str, float], samples: list[dict[str, float]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows = []
    for r in out.results:
        d = r.row()
        d["measured"] = r.t_sched >= cfg.warmup
        rows.append(d)
    measured = [r for r in out.results if r.t_sched >= cfg.warmup]
    ok = [r for r in measured if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    span = (max(r.t_send + (r.e2e or 0) for r in ok) - min(r.t_send for r in ok)) if ok else 0.0
    n_all = len(out.results)
    errors = [r for r in out.results if r.error]
    shed = [r for r in out.results if r.shed]
    c0 = c0 or dict.fromkeys(c1, 0.0)
    dq = c1["queries"] - c0["queries"]
    backlog = [r.t_send - r.t_sched for r in measured if r.t_send >= 0]
    served: dict[str, int] = {}
    for r in ok:
        served[r.served_by] = served.get(r.served_by, 0) + 1
    summary = {
        "requests": n_all, "measured": len(measured), "ok": len(ok),
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99),
        "output_tokens_per_s": sum(r.out_tokens for r in ok) / span if span > 0 else None,
        "hit_rate": (c1["hits"] - c0["hits"]) / dq if dq > 0 else None,
        "hits": c1["hits"] - c0["hits"], "queries": dq,
        "client_hit_rate": sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok)),
        "error_pct": 100 * len(errors) / n_all if n_all else 0.0,
        "shed_pct": 100 * len(shed) / n_all if n_all else 0.0,
        "errors_sample": sorted({r.error for r in errors})[:5],
        "preemptions": c1["preemptions"] - c0["preemptions"],
        "server_ttft_mean": _ratio(c1["ttft_sum"] - c0["ttft_sum"], c1["ttft_count"] - c0["ttft_count"]),
        "server_queue_mean": _ratio(c1["queue_sum"] - c0["queue_sum"], c1["queue_count"] - c0["queue_count"]),
        "waiting_mean": sum(s["waiting"] for s in samples) / len(samples) if samples else None,
        "waiting_max": max((s["waiting"] for s in samples), default=None),
        "kv_usage_mean": sum(s["kv"] for s in samples) / len(samples) if samples else None,
        "send_lag_p99": out.send_lag_p99,  # the load generator's own lateness
        "backlog_p99": pct(backlog, 99),  # includes multi-turn turns waiting for the previous answer
        "served_by": dict(sorted(served.items())),
        "cpu_pct": cpu,
    }
    return summary, rows


async def run_one(target: Target, workload_name: str, pods: SimPods, http: Any, cfg: QualityConfig,
                  seed: int | None = None, rate: float | None = None, duration: float | None = None
                  ) -> dict[str, Any]:
    if not await pods.wait_idle(http):
        raise RuntimeError("pods did not become idle before the run")
    await pods.reset_prefix_caches(http)
    kw = cfg.workload_kw.get(workload_name, {})
    seed = cfg.seed if seed is None else seed
    duration = duration or cfg.duration
    workload = wl.build(workload_name, seed, cfg.rate if rate is None else rate, duration, **kw)
    meter = CpuMeter({"sim": pods.pid, "loadgen": os.getpid(), **target.pids()})
    snap: dict[str, Any] = {}

    # The measurement window is [warmup, duration): counters, CPU and pod busy time are read at both ends
    # (the prefix-cache counters again after the drain, so that late answers count too).
    async def at_warmup() -> None:
        snap["c0"] = await pods.counters(http)
        snap["busy0"], snap["t_busy0"] = await pods.busy(http), time.monotonic()
        meter.start()

    async def at_end() -> None:
        snap["cpu"] = meter.stop()
        snap["util"] = (await pods.busy(http) - snap["busy0"]) / (time.monotonic() - snap["t_busy0"]) / pods.n

    await pods.timings(http)  # drop what earlier runs left
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_pods(pods, http, samples, stop))
    t0 = time.monotonic()
    out = await run_open_loop(http, target.url, workload, drain_s=cfg.drain,
                              at=[(cfg.warmup, at_warmup), (duration, at_end)])
    stop.set()
    await sampler
    c1 = await pods.counters(http)
    summary, rows = summarize(out, cfg, snap.get("c0"), c1, snap.get("cpu", {}), samples)
    summary["pod_stepping_pct"] = 100 * snap["util"] if "util" in snap else None
    summary["ttft_parts"] = ttft_parts(out.results, await pods.timings(http), cfg.warmup)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    audit = await target.audit(http)
    if audit is not None:
        summary["audit"] = audit
    return {"workload": workload_name, "target": target.name, "seed": seed, "params": workload.params,
            "summary": summary, "requests": rows}


def ttft_parts(results: list[Any], timings: dict[str, tuple[float, float | None]], warmup: float
               ) -> dict[str, float | None]:
    """A client's TTFT split by the pods' own clock: the path to the pod (client, router, proxy), the pod's
    time to its first token, and the path back; p50/p90/p99 of each over measured streamed requests."""
    parts: dict[str, list[float]] = {"to_pod": [], "pod": [], "back": []}
    for r in results:
        seen = timings.get(str(r.i))
        if r.t_sched < warmup or not r.ok or r.ttft is None or seen is None or seen[1] is None:
            continue
        arrival, first = seen
        parts["to_pod"].append(arrival - r.sent_at)
        parts["pod"].append(first - arrival)
        parts["back"].append(r.ttft - (first - r.sent_at))
    return {f"{k}_p{q}": pct(v, q) for k, v in parts.items() for q in (50, 90, 99)} | {"timed": len(parts["pod"])}


HEADER = ["workload", "target", "reqs", "TTFT p50", "p90", "p99", "e2e p50", "p99", "out tok/s", "hit %",
          "err %", "shed %", "pod TTFT", "queue", "CPU ours/others"]


def _cpu(c: dict[str, float]) -> str:
    if "box" not in c:
        return "-"
    return f"{c['box'] - c['others']:.0f}/{c['others']:.0f}%"


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in runs:
        s = r["summary"]
        out.append([r["workload"], r["target"], str(s["requests"]),
                    fmt(s["ttft_p50"], 0, 1000, " ms"), fmt(s["ttft_p90"], 0, 1000, " ms"),
                    fmt(s["ttft_p99"], 0, 1000, " ms"), fmt(s["e2e_p50"], 2, 1, " s"), fmt(s["e2e_p99"], 2, 1, " s"),
                    fmt(s["output_tokens_per_s"], 0), fmt(s["hit_rate"], 1, 100), fmt(s["error_pct"], 1),
                    fmt(s["shed_pct"], 1), fmt(s["server_ttft_mean"], 0, 1000, " ms"), fmt(s["waiting_mean"], 1),
                    _cpu(s["cpu_pct"])])
    return out


def verdicts(runs: list[dict[str, Any]]) -> list[str]:
    """EPP (default config) against round robin and vllm-router cache_aware on p90 TTFT."""
    by = {(r["workload"], r["target"]): r["summary"] for r in runs}
    lines = []
    for w in dict.fromkeys(r["workload"] for r in runs):
        epp = by.get((w, "epp-default"))
        if not epp or epp["ttft_p90"] is None:
            continue
        parts = []
        for other in ("envoy-rr", "vllm-router-cache-aware", "vllm-router-round-robin", "epp-gie", "epp-prefix"):
            o = by.get((w, other))
            if o and o["ttft_p90"]:
                parts.append(f"{o['ttft_p90'] / epp['ttft_p90']:.2f}x vs {other}")
        if parts:
            lines.append(f"{w}: epp-default p90 TTFT {epp['ttft_p90'] * 1000:.0f} ms; "
                         "ratio (other p90 / EPP p90): " + ", ".join(parts))
    return lines


async def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    out_dir = cfg.out or RESULTS / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    seeds = cfg.seeds or [cfg.seed]
    kv_events = any(t in KV_EVENT_TARGETS for t in cfg.targets)
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    t_start = time.monotonic()
    descriptions: dict[str, str] = {}
    pod_args: dict[str, list[str]] = {}
    all_jobs = jobs(cfg)
    async with new_session() as http:
        i = 0
        while i < len(all_jobs):
            group = [j for j in all_jobs[i:] if j.pod_key == all_jobs[i].pod_key]
            i += len(group)
            # The pods start once per pod setting; every target of every workload routes to the same pods.
            pods = SimPods(cfg.pods, _sim_args(cfg, group[0]), out_dir, kv_events=kv_events)
            await asyncio.to_thread(pods.start)
            log(f"pods: {cfg.pods} x sim {' '.join(pods.sim_args)} at {pods.endpoints[0]}..")
            try:
                # Workload-major: the targets run back to back on each workload (and seed), so slow drifts in
                # what else the machine is doing touch every target of a workload alike. Each run gets freshly
                # started processes.
                for job in group:
                    pod_args[job.workload] = pods.sim_args
                    for seed in seeds:
                        log(f"workload {job.workload} (seed {seed}, {job.rate:g} req/s)")
                        for name in cfg.targets:
                            target = make_targets([name], pods.endpoints, pods.kv_event_endpoints, wl.MODEL,
                                                  cfg.tokenizer)[0]
                            descriptions[target.name] = target.description
                            if cfg.record_traces and isinstance(target, EnvoyEpp):
                                cfg.record_traces.mkdir(parents=True, exist_ok=True)
                                trace = cfg.record_traces / f"{job.workload}-s{seed}-{target.name}.jsonl"
                                trace.unlink(missing_ok=True)
                                target.stack.epp_args += ["--record-trace", str(trace)]
                            try:
                                await asyncio.to_thread(target.start)
                            except Exception as exc:  # one router that cannot start must not end the suite
                                log(f"  {target.name:<24} did not start: {str(exc)[:300]}")
                                failures.append({"workload": job.workload, "target": target.name, "seed": seed,
                                                 "error": f"start: {str(exc)[:500]}"})
                                await asyncio.to_thread(target.stop)
                                continue
                            try:
                                r = await run_one(target, job.workload, pods, http, cfg, seed, job.rate,
                                                  job.duration)
                            finally:
                                await asyncio.to_thread(target.stop)
                            s = r["summary"]
                            log(f"  {target.name:<24} {s['requests']:>5} reqs  TTFT p90 {fmt(s['ttft_p90'], 0, 1000)}"
                                f" ms  hit {fmt(s['hit_rate'], 1, 100)}%  err {s['error_pct']:.1f}%  shed "
                                f"{s['shed_pct']:.1f}%  CPU ours/others {_cpu(s['cpu_pct'])}  ({s['wall_s']} s)")
                            runs.append(r)
            finally:
                await asyncio.to_thread(pods.stop)
    meta = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "suite": cfg.suite, "pods": cfg.pods, "sim_args": pod_args if cfg.suite else _sim_args(cfg),
        "rate": cfg.rate, "duration": cfg.duration, "warmup": cfg.warmup, "seeds": seeds,
        "targets": descriptions, "failures": failures,
        "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - t_start, 1),
    }
    result = {"meta": meta, "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    if cfg.suite:
        text = suite_tables(runs, cfg.targets)
        (out_dir / "table.md").write_text(suite_tables(runs, cfg.targets, markdown=True) + "\n")
        result["verdicts"] = suite_verdicts(runs)
    else:
        text = table(table_rows(runs), HEADER)
        (out_dir / "table.md").write_text(markdown_table(table_rows(runs), HEADER) + "\n")
        result["verdicts"] = verdicts(runs)
    (out_dir / "table.txt").write_text(text + "\n\n" + "\n".join(result["verdicts"]) + "\n")
    if cfg.plots and runs:
        plot_quality(runs, out_dir)
    result["table"] = text
    result["out_dir"] = str(out_dir)
    return result


# -- suite tables: one per workload, pooled over seeds ----------------------------------------------------
SUITE_HEADER = ["target", "runs", "reqs", "TTFT p50", "p90", "p99", "p90 by seed", "hit %", "err %", "shed %",
                "pod TTFT", "queue", "CPU ours/others", "send lag", "p90 to pod/pod/back"]


def pooled(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(workload, target) -> statistics over every seed's measured requests."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key in dict.fromkeys((r["workload"], r["target"]) for r in runs):
        rs = [r for r in runs if (r["workload"], r["target"]) == key]
        meas = [q for r in rs for q in r["requests"] if q["measured"]]
        ok = [q for q in meas if not q["error"] and not q["shed"] and 200 <= q["status"] < 300]
        ttft = [q["ttft"] for q in ok if q["ttft"] is not None]
        n_all = sum(r["summary"]["requests"] for r in rs)
        queries = sum(r["summary"].get("queries") or 0 for r in rs)
        hits = sum(r["summary"].get("hits") or 0 for r in rs)

        def mean(k: str, rs: list[dict[str, Any]] = rs) -> float | None:
            v = [r["summary"][k] for r in rs if r["summary"].get(k) is not None]
            return sum(v) / len(v) if v else None

        cpu = [r["summary"]["cpu_pct"] for r in rs if "box" in r["summary"]["cpu_pct"]]
        out[key] = {
            "runs": len(rs), "requests": n_all, "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90),
            "ttft_p99": pct(ttft, 99), "p90_by_seed": [r["summary"]["ttft_p90"] for r in rs],
            "hit_rate": hits / queries if queries else None,
            "error_pct": sum(r["summary"]["error_pct"] * r["summary"]["requests"] for r in rs) / max(1, n_all),
            "shed_pct": sum(r["summary"]["shed_pct"] * r["summary"]["requests"] for r in rs) / max(1, n_all),
            "server_ttft_mean": mean("server_ttft_mean"), "waiting_mean": mean("waiting_mean"),
            "cpu": {k: sum(c[k] for c in cpu) / len(cpu) for k in ("box", "others")} if cpu else {},
            # how late the load generator itself sent requests (p99, worst seed): above ~0.1 s the box was
            # short of CPU for the client too, and every latency of that run is suspect
            "send_lag": max(r["summary"]["send_lag_p99"] for r in rs),
            # p90 of each part of TTFT (see ttft_parts), averaged over seeds
            "parts_p90": [mean_part(rs, k) for k in ("to_pod_p90", "pod_p90", "back_p90")],
        }
    return out


def mean_part(rs: list[dict[str, Any]], key: str) -> float | None:
    v = [r["summary"]["ttft_parts"][key] for r in rs if (r["summary"].get("ttft_parts") or {}).get(key) is not None]
    return sum(v) / len(v) if v else None


def suite_tables(runs: list[dict[str, Any]], targets: list[str], markdown: bool = False) -> str:
    stats = pooled(runs)
    blocks = []
    for w in dict.fromkeys(r["workload"] for r in runs):
        rows = []
        for t in [t for t in dict.fromkeys([*targets, *(r["target"] for r in runs)]) if (w, t) in stats]:
            p = stats[(w, t)]
            rows.append([t, str(p["runs"]), str(p["requests"]), fmt(p["ttft_p50"], 0, 1000, " ms"),
                         fmt(p["ttft_p90"], 0, 1000, " ms"), fmt(p["ttft_p99"], 0, 1000, " ms"),
                         "/".join(fmt(v, 0, 1000) for v in p["p90_by_seed"]), fmt(p["hit_rate"], 1, 100),
                         fmt(p["error_pct"], 1), fmt(p["shed_pct"], 1), fmt(p["server_ttft_mean"], 0, 1000, " ms"),
                         fmt(p["waiting_mean"], 1), _cpu(p["cpu"]), fmt(p["send_lag"], 0, 1000, " ms"),
                         "/".join(fmt(v, 1, 1000) for v in p["parts_p90"])])
        params = next(r["params"] for r in runs if r["workload"] == w)
        title = f"{w}: " + ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("duration",))
        body = markdown_table(rows, SUITE_HEADER) if markdown else table(rows, SUITE_HEADER, align_left=1)
        blocks.append(f"### {title}\n\n{body}" if markdown else f"{title}\n{body}")
    return "\n\n".join(blocks)


# those that get a verdict line when they ran
EPP_VARIANTS = ("epp-default", "epp-precise", "epp-gie", "epp-default-none")


def suite_verdicts(runs: list[dict[str, Any]], epps: tuple[str, ...] = EPP_VARIANTS,
                   rr: str = "envoy-rr") -> list[str]:
    """Per workload and EPP variant that ran: EPP against the best peer (lowest p90, and lowest p99) and
    round robin. Ratios are EPP / other: above 1, EPP is slower."""
    stats = pooled(runs)
    lines = []
    for w, epp in ((w, epp) for w in dict.fromkeys(r["workload"] for r in runs) for epp in epps):
        e = stats.get((w, epp))
        if not e or e["ttft_p90"] is None:
            continue
        parts = []
        # A peer that failed more than 1% of the requests (errors or its own 429/503) is not a candidate for
        # "best": its percentiles are over the requests it did serve.
        failing = {t: stats[(w, t)]["error_pct"] + stats[(w, t)]["shed_pct"] for t in PEERS if (w, t) in stats}
        failing = {t: v for t, v in failing.items() if v > 1.0}
        for q in ("p90", "p99"):
            k = f"ttft_{q}"
            peers = [(stats[(w, t)][k], t) for t in PEERS
                     if (w, t) in stats and stats[(w, t)][k] is not None and t not in failing]
            if peers:
                best, name = min(peers)
                verdict = "EPP better" if e[k] < best * 0.95 else ("EPP worse" if e[k] > best * 1.05 else "tie")
                parts.append(f"{q} {e[k] * 1000:,.0f} ms vs best peer {name} {best * 1000:,.0f} ms "
                             f"({e[k] / best:.2f}x, {verdict})")
        o = stats.get((w, rr))
        if o and o["ttft_p90"]:
            verdict = "EPP better" if e["ttft_p90"] < o["ttft_p90"] * 0.95 else (
                "EPP worse" if e["ttft_p90"] > o["ttft_p90"] * 1.05 else "tie")
            ratio = e["ttft_p90"] / o["ttft_p90"]
            parts.append(f"vs {rr} p90 {o['ttft_p90'] * 1000:,.0f} ms ({ratio:.2f}x, {verdict})")
        if e["error_pct"] or e["shed_pct"]:
            parts.append(f"EPP errors {e['error_pct']:.1f}% shed {e['shed_pct']:.1f}%")
        if failing:
            parts.append("not counted as best peer: " + ", ".join(f"{t} ({v:.1f}% failed)" for t, v in failing.items()))
        label = "EPP" if epp == "epp-default" else f"EPP ({epp})"
        lines.append(f"{w}: {label} " + "; ".join(parts))
    return lines


def parse_args(argv: list[str] | None) -> QualityConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = QualityConfig()
    # None = the default of the mode (suite or not); see QualityConfig and suite_config.
    ap.add_argument("--suite", choices=sorted(wl.SUITES), help="run a suite (pressure: the outside evaluation's "
                    "regimes, 8 pods, DeepSeek tokenizer, one table per workload)")
    ap.add_argument("--pods", type=int)
    ap.add_argument("--sim-profile")
    ap.add_argument("--num-gpu-blocks", type=int, help="KV blocks (16 tokens) per pod (suite: per workload)")
    ap.add_argument("--sim-arg", action="append", default=[], help="extra flag for python -m epp_sim (repeatable)")
    ap.add_argument("--tokenizer", help="the pods' --tokenizer (suite default: deepseek)")
    ap.add_argument("--workloads", help=f"comma list of {', '.join(wl.WORKLOADS)} (suite: of its workloads)")
    ap.add_argument("--targets", help=f"comma list of {', '.join(TARGETS)} (suite default: "
                                      f"{', '.join(PRESSURE_TARGETS)})")
    ap.add_argument("--rate", type=float, default=d.rate, help="requests/s (Poisson; not in suite mode)")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="suite mode: every workload's rate times this")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, help="seconds left out of the latency stats")
    ap.add_argument("--drain", type=float, default=d.drain)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--seeds", help="comma list of seeds: every workload x target runs once per seed")
    ap.add_argument("--set", action="append", default=[], metavar="WORKLOAD.PARAM=VALUE",
                    help="workload size override, e.g. shared-prefix.groups=32 or multi-turn.output_tokens=50,80")
    ap.add_argument("--out", type=Path, help="output directory (default bench/results/<timestamp>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--record-traces", type=Path, metavar="DIR",
                    help="EPP targets record every request to DIR/<workload>-s<seed>-<target>.jsonl (epp replay)")
    a = ap.parse_args(argv)
    kw: dict[str, dict[str, Any]] = {}
    for s in a.set:
        key, _, value = s.partition("=")
        w, _, param = key.partition(".")
        v: Any = tuple(int(x) for x in value.split(",")) if "," in value else (
            float(value) if "." in value else int(value))
        kw.setdefault(w, {})[param] = v
    given: dict[str, Any] = {k: v for k, v in dict(
        pods=a.pods, sim_profile=a.sim_profile, num_gpu_blocks=a.num_gpu_blocks, tokenizer=a.tokenizer,
        workloads=a.workloads.split(",") if a.workloads else None,
        targets=a.targets.split(",") if a.targets else None, duration=a.duration, warmup=a.warmup).items()
        if v is not None}
    common = dict(sim_extra=a.sim_arg, rate=a.rate, drain=a.drain, seed=a.seed, workload_kw=kw, out=a.out,
                  plots=not a.no_plots, seeds=[int(x) for x in a.seeds.split(",")] if a.seeds else [],
                  rate_scale=a.rate_scale, record_traces=a.record_traces)
    if a.suite:
        return suite_config(a.suite, **common, **given)
    return QualityConfig(**common, **given)


def audit_lines(runs: list[dict[str, Any]]) -> list[str]:
    """EPP's predictions against outcomes, per workload and EPP target (the first seed's run)."""
    out, seen = [], set()
    for r in runs:
        audit = r["summary"].get("audit")
        key = (r["workload"], r["target"])
        if not audit or key in seen:
            continue
        seen.add(key)
        parts = []
        for source, a in (audit.get("predictions") or {}).items():
            if not a.get("count"):
                continue
            if a["unit"] == "tokens":
                parts.append(f"{source}: accuracy {a['accuracy']:.3f}, |error| {a['mean_abs_error']:.0f} tokens, "
                             f"predicted/reported {a['predicted_over_actual']}")
            else:
                parts.append(f"{source}: |error| {a['mean_abs_error'] * 1000:.0f} ms, predicted/seen "
                             f"{a['predicted_over_actual']}")
        cpt = ", ".join(f"{v['chars_per_token']} chars/token" for v in (audit.get("chars_per_token") or {}).values())
        if parts:
            out.append(f"audit {r['workload']} {r['target']} (seed {r['seed']}): " + "; ".join(parts)
                       + (f"; learned {cpt}" if cpt else ""))
    return out


async def _cancellable(coro: Any) -> Any:
    """Run ``coro`` with SIGTERM/SIGINT cancelling it, so every child process is stopped on the way out."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await task


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        result = asyncio.run(_cancellable(run_quality(cfg)))
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(result["table"])
    print()
    for line in result["verdicts"]:
        print(line)
    for line in audit_lines(result["runs"]):
        print(line)
    for f in result["meta"]["failures"]:
        print(f"FAILED {f['workload']} / {f['target']} (seed {f['seed']}): {f['error'][:200]}")
    print(f"\nraw data, table and plots: {result['out_dir']}  ({result['meta']['wall_s']:.0f} s)")
    # A suite's peers may not serve every API (sglang-router has no /v1/messages): only EPP's errors fail it.
    bad = [r for r in result["runs"] if r["summary"]["error_pct"] > 0
           and (not cfg.suite or r["target"].startswith("epp"))]
    return 1 if bad or result["meta"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
