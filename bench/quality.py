"""Routing quality: the same seeded open-loop workloads against several routers in front of the same pods.

    python -m bench.quality                 # the full run (~8 min on 2 cores), or: make bench
    python -m bench.quality --workloads shared-prefix --targets envoy-rr,epp-default --duration 12

The simulated pods (``python -m sim``, profile ``realistic`` with a smaller KV cache) start once and are
shared by every target; before each run they are waited for until idle and their prefix caches are reset
(``POST /sim/control {"reset_prefix_cache": true}``). For each workload the targets run one after another,
each freshly started and stopped after its run, so only the router under test uses CPU. Optional targets:
epp-default-none (response_body_mode NONE), vllm-router-power-of-two, vllm-router-consistent-hash.
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
from bench.harness import TARGETS, CpuMeter, SimPods, Target, make_targets
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


def _sim_args(cfg: QualityConfig) -> list[str]:
    return ["--profile", cfg.sim_profile, "--num-gpu-blocks", str(cfg.num_gpu_blocks), "--model", wl.MODEL,
            *cfg.sim_extra]


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


async def run_one(target: Target, workload_name: str, pods: SimPods, http: Any, cfg: QualityConfig) -> dict[str, Any]:
    if not await pods.wait_idle(http):
        raise RuntimeError("pods did not become idle before the run")
    await pods.reset_prefix_caches(http)
    kw = cfg.workload_kw.get(workload_name, {})
    workload = wl.build(workload_name, cfg.seed, cfg.rate, cfg.duration, **kw)
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

    samples: list[dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_pods(pods, http, samples, stop))
    t0 = time.monotonic()
    out = await run_open_loop(http, target.url, workload, drain_s=cfg.drain,
                              at=[(cfg.warmup, at_warmup), (cfg.duration, at_end)])
    stop.set()
    await sampler
    c1 = await pods.counters(http)
    summary, rows = summarize(out, cfg, snap.get("c0"), c1, snap.get("cpu", {}), samples)
    summary["pod_stepping_pct"] = 100 * snap["util"] if "util" in snap else None
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    return {"workload": workload_name, "target": target.name, "params": workload.params, "summary": summary,
            "requests": rows}


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
        for other in ("envoy-rr", "vllm-router-cache-aware", "vllm-router-round-robin", "epp-prefix"):
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
    pods = SimPods(cfg.pods, _sim_args(cfg), out_dir)
    runs: list[dict[str, Any]] = []
    t_start = time.monotonic()
    await asyncio.to_thread(pods.start)
    log(f"pods: {cfg.pods} x sim {' '.join(_sim_args(cfg))} at {', '.join(pods.endpoints)}")
    descriptions: dict[str, str] = {}
    try:
        async with new_session() as http:
            # Workload-major: the targets run back to back on each workload, so slow drifts in what else the
            # machine is doing touch every target of a workload alike. Each run gets freshly started processes.
            for w in cfg.workloads:
                log(f"workload {w}")
                for name in cfg.targets:
                    target = make_targets([name], pods.endpoints)[0]
                    descriptions[target.name] = target.description
                    await asyncio.to_thread(target.start)
                    try:
                        r = await run_one(target, w, pods, http, cfg)
                    finally:
                        await asyncio.to_thread(target.stop)
                    s = r["summary"]
                    log(f"  {target.name:<24} {s['requests']:>5} reqs  TTFT p90 {fmt(s['ttft_p90'], 0, 1000)} ms  "
                        f"hit {fmt(s['hit_rate'], 1, 100)}%  err {s['error_pct']:.1f}%  CPU ours/others "
                        f"{_cpu(s['cpu_pct'])}  ({s['wall_s']} s)")
                    runs.append(r)
    finally:
        await asyncio.to_thread(pods.stop)
    meta = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "pods": cfg.pods, "sim_args": _sim_args(cfg), "rate": cfg.rate, "duration": cfg.duration,
        "warmup": cfg.warmup, "seed": cfg.seed,
        "targets": descriptions,
        "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - t_start, 1),
    }
    result = {"meta": meta, "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    text = table(table_rows(runs), HEADER)
    (out_dir / "table.txt").write_text(text + "\n")
    (out_dir / "table.md").write_text(markdown_table(table_rows(runs), HEADER) + "\n")
    if cfg.plots:
        plot_quality(runs, out_dir)
    result["table"] = text
    result["verdicts"] = verdicts(runs)
    result["out_dir"] = str(out_dir)
    return result


def parse_args(argv: list[str] | None) -> QualityConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = QualityConfig()
    ap.add_argument("--pods", type=int, default=d.pods)
    ap.add_argument("--sim-profile", default=d.sim_profile)
    ap.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks, help="KV blocks (16 tokens) per pod")
    ap.add_argument("--sim-arg", action="append", default=[], help="extra flag for python -m sim (repeatable)")
    ap.add_argument("--workloads", default=",".join(d.workloads), help=f"comma list of {', '.join(wl.WORKLOADS)}")
    ap.add_argument("--targets", default=",".join(d.targets), help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--rate", type=float, default=d.rate, help="requests/s (Poisson)")
    ap.add_argument("--duration", type=float, default=d.duration, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="seconds left out of the latency stats")
    ap.add_argument("--drain", type=float, default=d.drain)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--set", action="append", default=[], metavar="WORKLOAD.PARAM=VALUE",
                    help="workload size override, e.g. shared-prefix.groups=32 or multi-turn.output_tokens=50,80")
    ap.add_argument("--out", type=Path, help="output directory (default bench/results/<timestamp>)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    kw: dict[str, dict[str, Any]] = {}
    for s in a.set:
        key, _, value = s.partition("=")
        w, _, param = key.partition(".")
        v: Any = tuple(int(x) for x in value.split(",")) if "," in value else (
            float(value) if "." in value else int(value))
        kw.setdefault(w, {})[param] = v
    return QualityConfig(pods=a.pods, sim_profile=a.sim_profile, num_gpu_blocks=a.num_gpu_blocks, sim_extra=a.sim_arg,
                         workloads=a.workloads.split(","), targets=a.targets.split(","), rate=a.rate,
                         duration=a.duration, warmup=a.warmup, drain=a.drain, seed=a.seed, workload_kw=kw,
                         out=a.out, plots=not a.no_plots)


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
    print(f"\nraw data, table and plots: {result['out_dir']}")
    bad = [r for r in result["runs"] if r["summary"]["error_pct"] > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
