"""EPP's own cost: latency it adds per request against Envoy routing statically, and the highest request rate
one EPP process sustains.

    python -m bench.overhead                 # or: make bench-overhead  (~7 min on 2 cores)

The pods use the ``instant`` simulator profile (no GPU time), so what remains is proxying and routing. One
LocalStack per ``response_body_mode`` (FULL_DUPLEX_STREAMED: every response chunk goes through EPP; NONE:
EPP sees the request only) with its baseline listener (round robin, no ext_proc) on the same Envoy.

1. Added latency, one request at a time, gateway and baseline requests alternating: p50/p99 of the
   difference's parts for non-streamed chat (``--prompt-tokens`` prompt, 16 output tokens) and for streamed
   1k-token answers (TTFT and end to end).
2. Throughput: closed-loop concurrency ramp 1, 2, 4, ... (non-streamed chat) until throughput stops growing
   (<5% for two steps, and at least up to 32) or errors appear; req/s, p50/p99 latency and EPP's CPU %
   (from /proc/<pid>/stat; 100% = one core) per step. The same ramp on the baseline listener shows what
   the box itself allows.
3. Large prompts (``--large-bytes`` 220 KB, ``--large-concurrency`` 150), streamed, TTFT through EPP against
   Envoy alone, three ways: a closed loop as a load tool runs one (each of 150 clients sends its next request
   when its last ends; phases alternate between the listeners) with the instant pods, where the loop runs as
   fast as the box's CPU allows; the same loop with pods that hold each request ``--large-pod-delay-ms`` (2 s,
   about a 58k-token prefill on one GPU) before their engine sees it, so that the pods, not this box's CPU,
   limit the loop as GPUs do; and synchronized bursts of 150 requests sent at once.
4. Targets: the figures above as ratios to Envoy's static route in the same run.
5. Scheduling time per decision at 8/64/256 endpoints (bench/scheduling_bench.py), when it is present.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import Planned, new_session, send
from bench.harness import CpuMeter
from bench.report import fmt, markdown_table, pct, table
from bench.workloads import MODEL, TextGen
from epp.stack.local import LocalStack

RESULTS = Path(__file__).parent / "results"


def _bodies(prompt_tokens: int, seed: int = 7) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    text = TextGen(seed).text(rng, prompt_tokens)
    base = {"model": MODEL, "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": text}]}
    plain = json.dumps({**base, "max_tokens": 16}).encode()
    stream = json.dumps({**base, "max_tokens": 1000, "stream": True,
                         "stream_options": {"include_usage": True}}).encode()
    return plain, stream


def _large_body(size: int, seed: int = 11) -> bytes:
    """A streamed chat request whose prompt is ``size`` bytes of text, 8 output tokens."""
    rng = random.Random(seed)
    gen = TextGen(seed)
    text = ""
    while len(text) < size:
        text += gen.text(rng, 2000) + "\n"
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text[:size]}], "max_tokens": 8,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()


async def added_latency(http: aiohttp.ClientSession, gateway: str, baseline: str, body: bytes, stream: bool,
                        n: int) -> dict[str, Any]:
    """``n`` requests to each listener, alternating, one at a time."""
    samples: dict[str, dict[str, list[float]]] = {"gateway": {"e2e": [], "ttft": []},
                                                  "baseline": {"e2e": [], "ttft": []}}
    errors = 0
    start = time.perf_counter()
    for i in range(-3, n):  # 3 warm-up pairs
        order = (("gateway", gateway), ("baseline", baseline)) if i % 2 else (("baseline", baseline),
                                                                             ("gateway", gateway))
        for name, url in order:
            r = await send(http, url, Planned(i, 0.0, "chat", body, stream=stream), start, timeout=60)
            if not r.ok:
                errors += 1
                continue
            if i >= 0:
                samples[name]["e2e"].append(r.e2e or 0.0)
                if r.ttft is not None:
                    samples[name]["ttft"].append(r.ttft)
    out: dict[str, Any] = {"n": n, "errors": errors}
    for metric in ("e2e", "ttft"):
        g, b = samples["gateway"][metric], samples["baseline"][metric]
        if not g or not b:
            continue
        for q in (50, 99):
            out[f"{metric}_p{q}_baseline"] = pct(b, q)
            out[f"{metric}_p{q}_gateway"] = pct(g, q)
            out[f"{metric}_p{q}_added"] = pct(g, q) - pct(b, q)  # type: ignore[operator]
    return out


async def closed_loop(http: aiohttp.ClientSession, url: str, body: bytes, concurrency: int,
                      seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                async with http.post(url + "/v1/chat/completions", data=body, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        continue
            except (aiohttp.ClientError, TimeoutError, OSError):
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "rps": len(lat) / wall,
            "p50": pct(lat, 50), "p99": pct(lat, 99)}


def _ttft_summary(ttft: dict[str, list[float]], out: dict[str, Any]) -> dict[str, Any]:
    if ttft["gateway"] and ttft["baseline"]:
        for q in (50, 99):
            out[f"ttft_p{q}_baseline"] = pct(ttft["baseline"], q)
            out[f"ttft_p{q}_gateway"] = pct(ttft["gateway"], q)
            out[f"ttft_p{q}_added"] = pct(ttft["gateway"], q) - pct(ttft["baseline"], q)  # type: ignore[operator]
    return out


async def _closed_loop_phase(http: aiohttp.ClientSession, url: str, body: bytes, concurrency: int, seconds: float,
                             pids: dict[str, int]) -> dict[str, Any]:
    """One phase of ``large_closed_loop`` on one listener: TTFTs, errors, and CPU over the counted part."""
    t0 = time.perf_counter()
    warmup = seconds / 4
    counted_from, deadline = t0 + warmup, t0 + seconds
    out: dict[str, Any] = {"ttft": [], "errors": 0, "first_error": None}

    async def client(k: int) -> None:
        await asyncio.sleep(warmup * k / concurrency)
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            r = await send(http, url, Planned(k, 0.0, "chat", body, stream=True), t0, timeout=120)
            if sent < counted_from:
                continue
            if not r.ok or r.ttft is None:
                out["errors"] += 1
                out["first_error"] = out["first_error"] or r.error
            else:
                out["ttft"].append(r.ttft)

    async def meter() -> CpuMeter:
        await asyncio.sleep(warmup)
        return CpuMeter(pids).start()

    *_, cpu = await asyncio.gather(*(client(k) for k in range(concurrency)), meter())
    # CPU until the last counted request ended; the rate over the window in which counted requests started
    out["cpu_s"] = {proc: v * (time.perf_counter() - counted_from) / 100 for proc, v in cpu.stop().items()}
    out["elapsed"] = deadline - counted_from
    return out


async def large_closed_loop(http: aiohttp.ClientSession, gateway: str, baseline: str, body: bytes, concurrency: int,
                            seconds: float, phases: int, pids: dict[str, int]) -> dict[str, Any]:
    """GIE's large-prompt case as its load tool runs it: ``concurrency`` clients in a closed loop (each sends its
    next streamed request when its last one ends), ``phases`` phases of ``seconds`` per listener, alternating
    (gateway, baseline, baseline, gateway, ...). Clients start spread over a phase's first quarter, whose requests
    are not counted (a load tool's steady state, not its start); CPU per request is over the counted part."""
    ttft: dict[str, list[float]] = {"gateway": [], "baseline": []}
    wall = {"gateway": 0.0, "baseline": 0.0}
    cpu_s: dict[str, dict[str, float]] = {"gateway": {}, "baseline": {}}
    out: dict[str, Any] = {"concurrency": concurrency, "seconds": seconds, "phases": phases, "bytes": len(body),
                           "errors": 0, "first_error": None}
    for i in range(2 * phases):
        name, url = (("gateway", gateway), ("baseline", baseline))[(i + i // 2) % 2]
        phase = await _closed_loop_phase(http, url, body, concurrency, seconds, pids)
        ttft[name] += phase["ttft"]
        wall[name] += phase["elapsed"]
        out["errors"] += phase["errors"]
        out["first_error"] = out["first_error"] or phase["first_error"]
        for proc, v in phase["cpu_s"].items():
            cpu_s[name][proc] = cpu_s[name].get(proc, 0.0) + v
    for name in ("gateway", "baseline"):
        n = len(ttft[name])
        out[f"requests_{name}"] = n
        out[f"rps_{name}"] = n / wall[name] if wall[name] else None
        # ms of CPU per request of each process (and of the whole box), over the counted windows
        out[f"cpu_ms_per_req_{name}"] = {p: round(1000 * v / n, 2) for p, v in cpu_s[name].items()} if n else {}
    return _ttft_summary(ttft, out)


async def _pod_delay(http: aiohttp.ClientSession, endpoints: list[str], ms: float) -> None:
    """Every pod holds each inference request ``ms`` before its engine sees it (the simulator's ``delay_ms``)."""
    async def one(ep: str) -> None:
        async with http.post(f"http://{ep}/sim/control", json={"delay_ms": ms}) as r:
            r.raise_for_status()
    await asyncio.gather(*(one(ep) for ep in endpoints))


async def large_prompts(http: aiohttp.ClientSession, gateway: str, baseline: str, body: bytes, concurrency: int,
                        rounds: int) -> dict[str, Any]:
    """``rounds`` bursts of ``concurrency`` streamed requests carrying a large prompt, to each listener in turn
    (alternating which goes first): TTFT with EPP against Envoy alone, where body streaming through EPP costs
    most (GIE's scale complaint: 220 KB prompts at concurrency 150)."""
    ttft: dict[str, list[float]] = {"gateway": [], "baseline": []}
    errors = 0
    first_error: str | None = None
    start = time.perf_counter()
    for i in range(rounds):
        order = (("gateway", gateway), ("baseline", baseline)) if i % 2 else (("baseline", baseline),
                                                                             ("gateway", gateway))
        for name, url in order:
            results = await asyncio.gather(*(send(http, url, Planned(k, 0.0, "chat", body, stream=True), start,
                                                  timeout=120) for k in range(concurrency)))
            for r in results:
                if not r.ok or r.ttft is None:
                    errors += 1
                    first_error = first_error or r.error
                else:
                    ttft[name].append(r.ttft)
    out: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds, "bytes": len(body), "errors": errors,
                           "first_error": first_error}
    return _ttft_summary(ttft, out)


async def ramp(http: aiohttp.ClientSession, url: str, body: bytes, pids: dict[str, int], seconds: float,
               max_concurrency: int, log: Any, min_concurrency: int = 32) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    c = 1
    flat = 0
    await closed_loop(http, url, body, 4, min(1.0, seconds))  # warm connections and EPP
    while c <= max_concurrency:
        meter = CpuMeter(pids).start()
        step = await closed_loop(http, url, body, c, seconds)
        step["cpu_pct"] = meter.stop()
        if "epp" in pids and step["requests"]:
            step["epp_cpu_ms_per_req"] = step["cpu_pct"]["epp"] * 10 * seconds / step["requests"]
        steps.append(step)
        log(f"    c={c:<4} {step['rps']:7.0f} req/s  p50 {fmt(step['p50'], 1, 1000)} ms  p99 "
            f"{fmt(step['p99'], 1, 1000)} ms  errors {step['errors']}  CPU {step['cpu_pct']}")
        if step["errors"]:
            break
        best_before = max((s["rps"] for s in steps[:-1]), default=0.0)
        flat = flat + 1 if step["rps"] < 1.05 * best_before else 0
        if flat >= 2 and c >= min_concurrency:  # not before: on a shared box one slow step is noise
            break
        c *= 2
    return steps


def _peak(steps: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s for s in steps if not s["errors"]] or steps
    return max(ok, key=lambda s: s["rps"])


async def run_overhead(pods: int = 4, modes: tuple[str, ...] = ("FULL_DUPLEX_STREAMED", "NONE"), n_plain: int = 1000,
                       n_stream: int = 150, prompt_tokens: int = 1000, step_seconds: float = 4.0,
                       max_concurrency: int = 256, baseline_ramp: bool = True, log: Any = print,
                       large_bytes: int = 220_000, large_concurrency: int = 150, large_seconds: float = 12.0,
                       large_phases: int = 2, large_rounds: int = 2,
                       large_pod_delay_ms: float = 2000.0) -> dict[str, Any]:
    plain, stream = _bodies(prompt_tokens)
    large = _large_body(large_bytes) if large_rounds or large_phases else b""
    out: dict[str, Any] = {"modes": {}, "params": dict(pods=pods, n_plain=n_plain, n_stream=n_stream,
                                                       prompt_tokens=prompt_tokens, step_seconds=step_seconds)}
    for mode in modes:
        # Room for the large-prompt case: ~58k-token prompts, up to ~40 of them on a pod at once.
        sim_args = ["--profile", "instant", "--model", MODEL, "--max-model-len", "131072", "--num-gpu-blocks", "150000"]
        stack = LocalStack(pods=pods, sim_args=sim_args, baseline=True, response_body_mode=mode)
        await asyncio.to_thread(stack.start)
        try:
            assert stack.epp is not None and stack.epp.proc is not None
            assert stack.envoy is not None and stack.envoy.proc is not None
            assert stack.sim is not None and stack.sim.proc is not None
            baseline = f"http://127.0.0.1:{stack.baseline_port}"
            pids = {"epp": stack.epp.proc.pid, "envoy": stack.envoy.proc.pid, "sim": stack.sim.proc.pid,
                    "loadgen": os.getpid()}
            res: dict[str, Any] = {}
            async with new_session() as http:
                log(f"{mode}: added latency, non-streamed ({n_plain} pairs)")
                res["plain"] = await added_latency(http, stack.url, baseline, plain, False, n_plain)
                log(f"{mode}: added latency, streamed 1k tokens ({n_stream} pairs)")
                res["stream"] = await added_latency(http, stack.url, baseline, stream, True, n_stream)
                if large_phases:
                    log(f"{mode}: {large_bytes // 1000} KB prompts, closed loop at concurrency {large_concurrency}")
                    res["large"] = await large_closed_loop(http, stack.url, baseline, large, large_concurrency,
                                                           large_seconds, large_phases, pids)
                    if large_pod_delay_ms:
                        log(f"{mode}: the same, pods {large_pod_delay_ms:g} ms to their engine")
                        await _pod_delay(http, stack.endpoints, large_pod_delay_ms)
                        res["large_delayed"] = await large_closed_loop(
                            http, stack.url, baseline, large, large_concurrency,
                            large_seconds + large_pod_delay_ms / 1000, large_phases, pids)
                        res["large_delayed"]["pod_delay_ms"] = large_pod_delay_ms
                        await _pod_delay(http, stack.endpoints, 0.0)
                if large_rounds:
                    log(f"{mode}: {large_bytes // 1000} KB prompts, bursts of {large_concurrency}")
                    res["large_burst"] = await large_prompts(http, stack.url, baseline, large, large_concurrency,
                                                             large_rounds)
                log(f"{mode}: throughput ramp through EPP")
                res["ramp"] = await ramp(http, stack.url, plain, pids, step_seconds, max_concurrency, log)
                if baseline_ramp and mode == modes[0]:
                    log("baseline listener (no EPP): throughput ramp")
                    out["baseline_ramp"] = await ramp(http, baseline, plain,
                                                      {k: v for k, v in pids.items() if k != "epp"},
                                                      step_seconds, max_concurrency, log)
            out["modes"][mode] = res
        finally:
            await asyncio.to_thread(stack.cleanup)
    return out


def latency_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["response_body_mode", "request", "baseline p50", "EPP p50", "added p50", "baseline p99", "EPP p99",
              "added p99"]
    rows = []
    for mode, res in result["modes"].items():
        for kind, metric, label in (("plain", "e2e", "non-streamed, e2e"), ("stream", "ttft", "stream 1k, TTFT"),
                                    ("stream", "e2e", "stream 1k, e2e")):
            r = res[kind]
            if f"{metric}_p50_added" not in r:
                continue
            rows.append([mode, label] + [fmt(r[f"{metric}_p{q}_{w}"], 2, 1000, " ms")
                                         for q in (50, 99) for w in ("baseline", "gateway", "added")])
    return header, rows


def throughput_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["path", "peak req/s", "at conc.", "p50", "p99", "EPP CPU", "EPP CPU/req", "1 core of EPP",
              "Envoy CPU", "CPU ours/others"]
    rows = []
    items = [(f"Envoy + EPP ({m})", r["ramp"]) for m, r in result["modes"].items()]
    if result.get("baseline_ramp"):
        items.append(("Envoy baseline (no EPP)", result["baseline_ramp"]))
    for label, steps in items:
        p = _peak(steps)
        cpu = p["cpu_pct"]
        per_req = p.get("epp_cpu_ms_per_req")
        rows.append([label, fmt(p["rps"], 0), str(p["concurrency"]), fmt(p["p50"], 1, 1000, " ms"),
                     fmt(p["p99"], 1, 1000, " ms"), fmt(cpu.get("epp"), 0, 1, "%"), fmt(per_req, 2, 1, " ms"),
                     fmt(1000 / per_req if per_req else None, 0, 1, " req/s"), fmt(cpu.get("envoy"), 0, 1, "%"),
                     f"{cpu['box'] - cpu['others']:.0f}/{cpu['others']:.0f}%" if "box" in cpu else "-"])
    return header, rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def target_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Issue 13's targets, as ratios to Envoy's static route measured in the same run (absolute figures move
    with the machine)."""
    header = ["target", "mode", "EPP", "Envoy alone", "ratio", "goal", "met"]
    rows: list[list[str]] = []

    def row(name: str, mode: str, ours: float | None, envoy: float | None, ratio: float | None, goal: float,
            unit: str = " ms", scale: float = 1000, higher_is_better: bool = False) -> None:
        met = "-" if ratio is None else ("yes" if (ratio >= goal if higher_is_better else ratio <= goal) else "no")
        rows.append([name, mode, fmt(ours, 2, scale, unit), fmt(envoy, 2, scale, unit), fmt(ratio, 2), f"{goal:g}",
                     met])

    base_steps = result.get("baseline_ramp") or []
    base = _peak(base_steps) if base_steps else None
    envoy_cpu_per_req = (base["cpu_pct"].get("envoy", 0) * 10 / base["rps"]) if base and base["rps"] else None
    for mode, res in result["modes"].items():
        plain = res["plain"]
        for q, goal in ((50, 1.0), (99, 2.0)):
            added, env = plain.get(f"e2e_p{q}_added"), plain.get(f"e2e_p{q}_baseline")
            row(f"added p{q} / Envoy p{q} (non-streamed)", mode, added, env, _ratio(added, env), goal)
        stream = res["stream"]
        g, b = stream.get("e2e_p50_gateway"), stream.get("e2e_p50_baseline")
        row("streamed 1k answer, e2e p50 / Envoy's", mode, g, b, _ratio(g, b), 1.05)
        peak = _peak(res["ramp"]) if res["ramp"] else None
        if peak and base:
            row("peak req/s / Envoy alone's", mode, peak["rps"], base["rps"], _ratio(peak["rps"], base["rps"]),
                0.5, " req/s", 1, higher_is_better=True)
            per_req = peak.get("epp_cpu_ms_per_req")
            row("EPP CPU per request / Envoy's", mode, per_req, envoy_cpu_per_req, _ratio(per_req, envoy_cpu_per_req),
                5.0, " ms", 1)
        delayed = res.get("large_delayed") or {}
        for key, how in (("large", "closed loop, instant pods"),
                         ("large_delayed", f"closed loop, pods {delayed.get('pod_delay_ms', 0) / 1000:g} s"),
                         ("large_burst", "bursts")):
            large = res.get(key)
            if large and "ttft_p50_added" in large:
                added = large["ttft_p50_added"]
                rows.append([f"{large['bytes'] // 1000} KB prompts x{large['concurrency']}, {how}: added TTFT p50 "
                             "(p99)", mode, f"{fmt(added, 1, 1000)} ({fmt(large['ttft_p99_added'], 1, 1000)}) ms",
                             f"{fmt(large['ttft_p50_baseline'], 1, 1000)} ms", "-", "20 ms",
                             "yes" if added <= 0.020 else "no"])
    return header, rows


def scheduling_table(decisions: int = 200) -> str | None:
    """The scheduling-cost table of bench/scheduling_bench.py, if that benchmark exists here."""
    try:
        from bench import scheduling_bench
    except ImportError:
        return None
    try:
        rows = scheduling_bench.run_bench(decisions=decisions)
        return scheduling_bench.format_table(rows)
    except Exception as e:
        return f"(bench.scheduling_bench failed: {type(e).__name__}: {e})"


def render(result: dict[str, Any]) -> str:
    h1, r1 = latency_rows(result)
    h2, r2 = throughput_rows(result)
    h3, r3 = target_rows(result)
    parts = ["Added latency (one request at a time; instant pods):", table(r1, h1),
             "", "Throughput (closed-loop ramp, non-streamed chat):", table(r2, h2),
             "", "Targets (ratios to Envoy's static route, same run):", table(r3, h3)]
    if result.get("scheduling"):
        parts += ["", "Scheduling time per decision (bench/scheduling_bench.py):", result["scheduling"]]
    return "\n".join(parts)


async def _cancellable(coro: Any) -> Any:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    return await task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--modes", default="FULL_DUPLEX_STREAMED,NONE")
    ap.add_argument("--requests", type=int, default=1000, help="non-streamed request pairs")
    ap.add_argument("--stream-requests", type=int, default=150, help="streamed 1k-token request pairs")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--step-seconds", type=float, default=4.0)
    ap.add_argument("--max-concurrency", type=int, default=256)
    ap.add_argument("--no-baseline-ramp", action="store_true")
    ap.add_argument("--large-bytes", type=int, default=220_000, help="prompt size of the large-prompt case")
    ap.add_argument("--large-concurrency", type=int, default=150)
    ap.add_argument("--large-seconds", type=float, default=12.0, help="length of a closed-loop phase")
    ap.add_argument("--large-phases", type=int, default=2, help="closed-loop phases per listener (0: skip)")
    ap.add_argument("--large-rounds", type=int, default=2, help="bursts per listener (0: skip)")
    ap.add_argument("--large-pod-delay-ms", type=float, default=2000.0,
                    help="the closed loop again with pods this slow to start a request (0: skip)")
    ap.add_argument("--no-scheduling", action="store_true", help="skip bench/scheduling_bench.py's table")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    out_dir = a.out or RESULTS / dt.datetime.now().strftime("overhead-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(_cancellable(run_overhead(
            pods=a.pods, modes=tuple(a.modes.split(",")), n_plain=a.requests, n_stream=a.stream_requests,
            prompt_tokens=a.prompt_tokens, step_seconds=a.step_seconds, max_concurrency=a.max_concurrency,
            baseline_ramp=not a.no_baseline_ramp, large_bytes=a.large_bytes,
            large_concurrency=a.large_concurrency, large_seconds=a.large_seconds, large_phases=a.large_phases,
            large_rounds=a.large_rounds, large_pod_delay_ms=a.large_pod_delay_ms)))
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130
    if not a.no_scheduling:
        result["scheduling"] = scheduling_table()
    result["meta"] = {"command": " ".join(shlex.quote(x) for x in sys.argv), "cpus": os.cpu_count(),
                      "when": dt.datetime.now().isoformat(timespec="seconds")}
    text = render(result)
    (out_dir / "overhead.json").write_text(json.dumps(result, indent=1))
    (out_dir / "table.txt").write_text(text + "\n")
    h1, r1 = latency_rows(result)
    h2, r2 = throughput_rows(result)
    h3, r3 = target_rows(result)
    (out_dir / "table.md").write_text(markdown_table(r1, h1) + "\n\n" + markdown_table(r2, h2) + "\n\n" +
                                      markdown_table(r3, h3) + "\n")
    print()
    print(text)
    print(f"\nraw data: {out_dir}")
    cases = ("plain", "stream", "large", "large_delayed", "large_burst")
    errors = sum(r[k]["errors"] for r in result["modes"].values() for k in cases if k in r)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
