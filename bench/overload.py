"""Overload: two priorities through Envoy + EPP + simulated pods, offered 2x the pods' capacity, then a burst.

    python -m bench.overload                          # four configurations, about 4.5 minutes
    python -m bench.overload --configs flow-control --out /tmp/overload

Traffic: ``interactive`` requests (priority 10, path prefix ``/interactive/``) and ``batch`` requests
(priority -1, sheddable, ``/batch/``); Envoy sets the objective header from the prefix, as a gateway policy
does. Streaming chat completions, Poisson arrivals, a fixed seed. Phases:

1. ``unloaded``: interactive alone at ``--high-share`` x capacity: its TTFT without competition.
2. ``2x``: interactive as before, plus batch, together ``--overload`` x capacity.
3. ``burst``: batch jumps so the total is ``--burst`` x capacity.
4. ``after``: back to the 2x mix.

Capacity (requests/s) is measured first: a closed loop with as many clients as the pods have batch slots.

Configurations (each a fresh stack):

* ``default``: EPP's default, legacy admission (no queue in EPP; sheddable requests refused with 429 while
  the utilization detector says saturated, everything else goes to the pods).
* ``flow-control``: ``featureGates: [flowControl]``, ``concurrency-detector`` with ``maxConcurrency`` = the
  pods' batch size, sheddable band limited to a few waiting requests, 30 s TTL.
* ``holdback``: the same plus ``priority-holdback-policy``: the sheddable band dispatches only while the pool
  is below ``--min-ceiling`` of its slots, so a slot is free when an interactive request comes.
* ``reserve``: the same as ``flow-control`` plus ``priority-reserve-policy``: the sheddable band leaves free as
  many slots as the interactive band recently had in flight at once (its own demand, not a fixed fraction).

Output: a table of TTFT p50/p99 and outcomes per configuration, phase and band; a PNG of TTFT over time per
band (drops marked) per configuration; the raw results as JSON. Every request has exactly one outcome on the
client (200, 429, 503, other error) and is reconciled with EPP's counters (requests routed, requests refused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import Planned, Result, new_session, send
from bench.report import fmt, pct, table
from bench.soak import metric_sum, read_metrics
from epp.stack.local import LocalStack

MODEL = "demo-model"
BANDS = {"interactive": 10, "batch": -1}
ROUTES = {f"/{band}/": {"x-gateway-inference-objective": band} for band in BANDS}
PHASES = ("unloaded", "2x", "burst", "after")


@dataclass
class OverloadConfig:
    pods: int = 2
    max_num_seqs: int = 8
    step_ms: float = 20.0
    max_tokens: int = 16
    prompt_words: int = 60
    high_share: float = 0.5  # interactive load, as a fraction of capacity (the same in every phase)
    overload: float = 2.0  # total offered load in the 2x phases, x capacity
    burst: float = 4.0  # total offered load during the burst, x capacity
    durations: dict[str, float] = field(default_factory=lambda: {"unloaded": 10.0, "2x": 25.0, "burst": 5.0,
                                                                  "after": 10.0})
    calibrate_s: float = 5.0
    configs: tuple[str, ...] = ("default", "flow-control", "holdback", "reserve")
    min_ceiling: float = 0.5  # holdback: the sheddable band dispatches while the pool is below this
    seed: int = 11
    out: Path | None = None  # where to write the PNG and the JSON

    def sim_args(self) -> list[str]:
        return ["--profile", "fast", "--model", MODEL, "--max-num-seqs", str(self.max_num_seqs),
                "--step-fixed-ms", f"{self.step_ms:g}"]

    def epp_config(self, name: str) -> str | None:
        if name == "default":
            return None
        policy, params = {"holdback": ("priority-holdback-policy", f"{{minCeiling: {self.min_ceiling}}}"),
                          "reserve": ("priority-reserve-policy", "{}")}.get(name, ("", ""))
        return (
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n"
            "- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n"
            f"- type: concurrency-detector\n  parameters: {{maxConcurrency: {self.max_num_seqs}}}\n"
            + (f"- type: {policy}\n  parameters: {params}\n" if policy else "") +
            "schedulingProfiles:\n- name: default\n  plugins:\n  - {pluginRef: queue-scorer, weight: 2}\n"
            "  - {pluginRef: kv-cache-utilization-scorer, weight: 2}\n  - {pluginRef: prefix-cache-scorer, weight: 3}\n"
            "saturationDetector: {pluginRef: concurrency-detector}\n"
            "flowControl:\n  defaultRequestTTL: 30s\n"
            + (f"  usageLimitPolicyPluginRef: {policy}\n" if policy else "") +
            f"  defaultNegativePriorityBand: {{maxRequests: {max(2, self.pods * self.max_num_seqs // 2)}}}\n")


def _body(rng: random.Random, words: int, max_tokens: int, i: int) -> bytes:
    text = " ".join(f"w{rng.randrange(5000)}" for _ in range(words))
    return json.dumps({"model": MODEL, "max_tokens": max_tokens, "stream": True,
                       "messages": [{"role": "user", "content": f"{i}: {text}"}]}).encode()


def schedule(cfg: OverloadConfig, capacity: float) -> list[tuple[float, str, str]]:
    """(arrival s, band, phase), Poisson per band and phase."""
    rng = random.Random(cfg.seed)
    out: list[tuple[float, str, str]] = []
    t0 = 0.0
    for phase in PHASES:
        length = cfg.durations.get(phase, 0.0)
        total = 0.0 if phase == "unloaded" else (cfg.burst if phase == "burst" else cfg.overload)
        rates = {"interactive": cfg.high_share * capacity, "batch": max(0.0, total - cfg.high_share) * capacity}
        for band, rate in rates.items():
            t = t0
            while rate > 0:
                t += rng.expovariate(rate)
                if t >= t0 + length:
                    break
                out.append((t, band, phase))
        t0 += length
    out.sort()
    return out


async def calibrate(url: str, cfg: OverloadConfig) -> float:
    """Requests/s the pods complete with every batch slot busy (closed loop, interactive band)."""
    rng = random.Random(cfg.seed + 1)
    clients = cfg.pods * cfg.max_num_seqs
    done = 0
    deadline = time.perf_counter() + cfg.calibrate_s
    async with new_session() as http:
        async def client(k: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                p = Planned(i, 0.0, "chat", _body(rng, cfg.prompt_words, cfg.max_tokens, k * 100000 + i))
                r = await send(http, f"{url}/interactive", p, time.perf_counter(), 60)
                i += 1
                if r.ok and time.perf_counter() < deadline:
                    done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return done / (time.perf_counter() - t0)


def _outcome(r: Result) -> str:
    if r.ok:
        return "ok"
    if r.shed:
        return str(r.status)
    return "error"


async def run_config(name: str, cfg: OverloadConfig, capacity: float | None, log: Any = print) -> dict[str, Any]:
    epp_args = ["--trust-objective-header", "--static-objectives", "interactive=10,batch=-1"]
    text = cfg.epp_config(name)
    if text:
        epp_args += ["--config-text", text]
    with LocalStack(pods=cfg.pods, sim_args=cfg.sim_args(), route_headers=ROUTES, epp_args=epp_args,
                    tls=False) as stack:
        if capacity is None:
            capacity = await calibrate(stack.url, cfg)
            log(f"capacity: {capacity:.1f} requests/s ({cfg.pods} pods x {cfg.max_num_seqs} slots)")
        arrivals = schedule(cfg, capacity)
        before = read_metrics(stack.metrics_port)
        rng = random.Random(cfg.seed + 2)
        bodies = [_body(rng, cfg.prompt_words, cfg.max_tokens, i) for i in range(len(arrivals))]
        log(f"{name}: {len(arrivals)} requests over {sum(cfg.durations.values()):g}s")
        async with new_session() as http:
            start = time.perf_counter() + 0.05

            async def one(i: int, t: float, band: str) -> Result:
                await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
                return await send(http, f"{stack.url}/{band}", Planned(i, t, "chat", bodies[i], tag=band), start, 120)

            results = await asyncio.gather(*(one(i, t, band) for i, (t, band, _) in enumerate(arrivals)))
        after = _settled(stack)
    rows = []
    for (t, band, phase), r in zip(arrivals, results, strict=True):
        rows.append({"t": t, "band": band, "phase": phase, "status": r.status, "outcome": _outcome(r),
                     "ttft": r.ttft, "e2e": r.e2e, "error": r.error})

    def delta(metric: str, **labels: str) -> float:
        return metric_sum(after, metric, **labels) - metric_sum(before, metric, **labels)

    routed = delta("inference_objective_request_total")
    refused = {status: delta("epp_rejections_total", status=status) for status in ("429", "503")}
    client_ok = sum(1 for r in rows if r["outcome"] == "ok")
    client_refused = {s: sum(1 for r in rows if r["outcome"] == s) for s in ("429", "503")}
    errors = sum(1 for r in rows if r["outcome"] == "error")
    reconciled = routed == client_ok + errors and all(refused[s] == client_refused[s] for s in refused)
    return {"config": name, "capacity": capacity, "rows": rows, "reconciliation": {
        "client_ok": client_ok, "client_refused": client_refused, "client_errors": errors,
        "epp_routed": routed, "epp_refused": refused, "reconciled": reconciled}}


def _settled(stack: LocalStack, timeout: float = 30.0) -> dict[str, list[tuple]]:
    """EPP's counters once nothing is in flight or held any more."""
    deadline = time.monotonic() + timeout
    while True:
        m = read_metrics(stack.metrics_port)
        busy = metric_sum(m, "inference_objective_running_requests") + \
            metric_sum(m, "inference_extension_flow_control_queue_size")
        if busy == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for run in runs:
        for phase in PHASES:
            for band in BANDS:
                rows = [r for r in run["rows"] if r["phase"] == phase and r["band"] == band]
                if not rows:
                    continue
                ttft = [r["ttft"] for r in rows if r["outcome"] == "ok" and r["ttft"] is not None]
                counts = {k: str(sum(r["outcome"] == k for r in rows)) for k in ("429", "503", "error")}
                out.append([run["config"], phase, band, str(len(rows)), str(len(ttft)),
                            fmt(pct(ttft, 50), 0, 1000), fmt(pct(ttft, 99), 0, 1000),
                            counts["429"], counts["503"], counts["error"]])
    return out


HEADER = ["config", "phase", "band", "sent", "ok", "TTFT p50 ms", "TTFT p99 ms", "429", "503", "errors"]


def verdicts(runs: list[dict[str, Any]]) -> list[str]:
    lines = []
    for run in runs:
        rows = run["rows"]
        base = [r["ttft"] for r in rows if r["phase"] == "unloaded" and r["band"] == "interactive"
                and r["outcome"] == "ok" and r["ttft"] is not None]
        loaded = [r["ttft"] for r in rows if r["phase"] in ("2x", "burst", "after") and r["band"] == "interactive"
                  and r["outcome"] == "ok" and r["ttft"] is not None]
        b99, l99 = pct(base, 99), pct(loaded, 99)
        shed_high = sum(1 for r in rows if r["band"] == "interactive" and r["outcome"] != "ok")
        ratio = f"{l99 / b99:.2f}x" if b99 and l99 else "-"
        rec = run["reconciliation"]
        lines.append(f"{run['config']}: interactive TTFT p99 under overload {fmt(l99, 0, 1000)} ms vs "
                     f"{fmt(b99, 0, 1000)} ms unloaded ({ratio}); interactive not served: {shed_high}; "
                     f"batch refused: {sum(1 for r in rows if r['band'] == 'batch' and r['outcome'] != 'ok')}; "
                     f"reconciled with EPP's counters: {'yes' if rec['reconciled'] else 'NO ' + json.dumps(rec)}")
    return lines


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """TTFT over time per band (one panel per configuration); refused requests as marks at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.6 * len(runs)), squeeze=False, sharex=True)
    colors = {"interactive": "tab:blue", "batch": "tab:orange"}
    for ax, run in zip(axes[:, 0], runs, strict=True):
        rows = run["rows"]
        t_end = 0.0
        for band, color in colors.items():
            ok = [(r["t"], r["ttft"] * 1000) for r in rows if r["band"] == band and r["outcome"] == "ok"
                  and r["ttft"] is not None]
            if ok:
                ax.scatter(*zip(*ok, strict=True), s=5, color=color, alpha=0.5, label=f"{band} TTFT")
            dropped = [r["t"] for r in rows if r["band"] == band and r["outcome"] != "ok"]
            if dropped:
                ax.scatter(dropped, [0.5 if band == "batch" else 0.7] * len(dropped), marker="|", s=40,
                           color=color, alpha=0.6, label=f"{band} refused ({len(dropped)})")
            t_end = max([t_end, *(r["t"] for r in rows)])
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"{run['config']} (capacity {run['capacity']:.1f} req/s)")
        t = 0.0
        for phase in PHASES[:-1]:
            t += run.get("durations", {}).get(phase, 0.0)
            ax.axvline(t, color="grey", lw=0.8, ls="--")
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    axes[-1, 0].set_xlabel("arrival (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


async def run_overload(cfg: OverloadConfig, log: Any = print) -> dict[str, Any]:
    runs = []
    capacity: float | None = None
    for name in cfg.configs:
        run = await run_config(name, cfg, capacity, log)
        run["durations"] = dict(cfg.durations)
        capacity = run["capacity"]
        runs.append(run)
    result: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
                              "runs": runs}
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        result["plot"] = str(plot(runs, cfg.out / "overload-ttft.png"))
        (cfg.out / "overload.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def render(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [table(summary_rows(runs), HEADER, align_left=3), "", *verdicts(runs)]
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    d = OverloadConfig()
    ap.add_argument("--pods", type=int, default=d.pods)
    ap.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    ap.add_argument("--step-ms", type=float, default=d.step_ms)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--overload", type=float, default=d.overload, help="total load in the 2x phases, x capacity")
    ap.add_argument("--burst", type=float, default=d.burst, help="total load during the burst, x capacity")
    ap.add_argument("--high-share", type=float, default=d.high_share, help="interactive load, x capacity")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every phase's duration")
    ap.add_argument("--configs", default=",".join(d.configs), help="default,flow-control,holdback,reserve")
    ap.add_argument("--min-ceiling", type=float, default=d.min_ceiling, help="holdback: the sheddable band's ceiling")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", type=Path, default=Path("bench/results/overload"))
    a = ap.parse_args(argv)
    cfg = OverloadConfig(pods=a.pods, max_num_seqs=a.max_num_seqs, step_ms=a.step_ms, max_tokens=a.max_tokens,
                         overload=a.overload, burst=a.burst, high_share=a.high_share, seed=a.seed, out=a.out,
                         min_ceiling=a.min_ceiling,
                         configs=tuple(c for c in a.configs.split(",") if c))
    cfg.durations = {k: v * a.scale for k, v in cfg.durations.items()}
    result = asyncio.run(run_overload(cfg, log=lambda *x: print(*x, file=sys.stderr)))
    print(render(result))
    return 0 if all(run["reconciliation"]["reconciled"] for run in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
