"""Prefill/decode disaggregation, aggregated vs disaggregated on the same number of pods, through Envoy and EPP.

Workload: long prompts with long outputs (RAG, summaries of documents) mixed with short chats, Poisson arrivals,
all streamed. Aggregated: every pod prefills and decodes, EPP's default configuration. Disaggregated: one
prefill pod, the others decode, ``manifests/examples/pd-disaggregation.yaml``. On an aggregated pod a long
prompt's prefill shares engine steps with every running decode, so inter-token latency spikes for everyone on
that pod; disaggregated, decode pods only decode. Measured by the client: TTFT (first content token), the gaps
between content tokens (ITL), output tokens per second; and from the pods, the prefills done remotely.

    python -m bench.pd [--pods 3] [--prefill 1] [--rate 5] [--duration 40] [--profile pressure] [--out DIR]

The simulator runs the ``pressure`` step model (10 ms a step, 0.1 ms per prefilled token, 2,048-token chunks, so a
3,000-4,000-token prompt stalls its pod's decodes for two steps of ~200 ms), with a KV cache large enough that
nothing is preempted (``--num-gpu-blocks 8192``). Inter-token latency p99 moves when such stalls hit more than
1% of the gaps: about (long prompts per pod per second) x (stalled steps each) x (step time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.report import fmt, pct, table
from bench.workloads import TextGen, poisson_arrivals
from epp.stack.local import LocalStack
from epp.stack.pd import PdPods
from epp.stack.tour import MODEL

HEADER = ["config", "pods", "reqs", "errors", "TTFT p50 long", "TTFT p99 long", "TTFT p50 short", "TTFT p99 short",
          "ITL p50", "ITL p99", "ITL p99 short", "out tok/s", "remote prefills"]


@dataclass(slots=True)
class BenchConfig:
    pods: int = 3
    prefill: int = 1
    rate: float = 5.0
    duration: float = 40.0
    seed: int = 1
    long_share: float = 0.4
    long_prompt: tuple[int, int] = (3000, 4000)
    long_output: tuple[int, int] = (200, 300)
    short_prompt: tuple[int, int] = (50, 150)
    short_output: tuple[int, int] = (100, 200)
    sim_args: list[str] = field(default_factory=lambda: sim_args("pressure"))
    out: Path | None = None


def sim_args(profile: str) -> list[str]:
    return ["--profile", profile, "--model", MODEL, "--num-gpu-blocks", "8192"]


@dataclass(slots=True)
class Rec:
    kind: str
    t_send: float = 0.0
    status: int = 0
    error: str = ""
    tokens: list[float] = field(default_factory=list)  # arrival time of each content token


def plan(cfg: BenchConfig) -> list[tuple[float, str, bytes]]:
    rng = random.Random(f"pd-{cfg.seed}")
    gen = TextGen(cfg.seed)
    out = []
    for i, t in enumerate(poisson_arrivals(rng, cfg.rate, cfg.duration)):
        kind = "long" if rng.random() < cfg.long_share else "short"
        prompt_range, output_range = ((cfg.long_prompt, cfg.long_output) if kind == "long"
                                      else (cfg.short_prompt, cfg.short_output))
        body = {"model": MODEL, "stream": True, "max_tokens": rng.randint(*output_range),
                "messages": [{"role": "user", "content": f"Request {i}: " + gen.text(rng, rng.randint(*prompt_range))}]}
        out.append((t, kind, json.dumps(body).encode()))
    return out


async def _send(http: aiohttp.ClientSession, url: str, kind: str, body: bytes, start: float, at: float) -> Rec:
    await asyncio.sleep(max(0.0, start + at - time.monotonic()))
    rec = Rec(kind, time.monotonic())
    try:
        async with http.post(f"{url}/v1/chat/completions", data=body,
                             headers={"content-type": "application/json"}) as resp:
            rec.status = resp.status
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    rec.tokens.append(time.monotonic())
            if resp.status != 200:
                rec.error = f"status {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as e:
        rec.error = type(e).__name__
    return rec


async def run_load(url: str, requests: list[tuple[float, str, bytes]]) -> tuple[list[Rec], float]:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.monotonic()
        recs = await asyncio.gather(*(_send(http, url, kind, body, start, t) for t, kind, body in requests))
        return list(recs), time.monotonic() - start


def summarize(name: str, pods: int, recs: list[Rec], wall: float, remote: int) -> dict[str, Any]:
    ok = [r for r in recs if not r.error and r.tokens]

    def ttft(kind: str) -> list[float]:
        return [r.tokens[0] - r.t_send for r in ok if r.kind == kind]

    def itl(kinds: tuple[str, ...]) -> list[float]:
        return [b - a for r in ok if r.kind in kinds for a, b in zip(r.tokens, r.tokens[1:], strict=False)]

    gaps, short_gaps = itl(("long", "short")), itl(("short",))
    return {"config": name, "pods": pods, "requests": len(recs), "errors": len(recs) - len(ok),
            "ttft_long_p50": pct(ttft("long"), 50), "ttft_long_p99": pct(ttft("long"), 99),
            "ttft_short_p50": pct(ttft("short"), 50), "ttft_short_p99": pct(ttft("short"), 99),
            "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99), "itl_short_p99": pct(short_gaps, 99),
            "out_tokens_per_s": sum(len(r.tokens) for r in ok) / wall if wall > 0 else 0.0,
            "remote_prefills": remote}


async def _remote_prefills(pods: PdPods) -> int:
    async with aiohttp.ClientSession() as http:
        total = 0
        for ep in pods.role_endpoints("decode"):
            async with http.get(f"http://{ep}/sim/state") as r:
                total += (await r.json())["pd"]["remote_prefills"]
        return total


async def run_config(cfg: BenchConfig, disaggregated: bool, log: Any = print) -> dict[str, Any]:
    prefill = cfg.prefill if disaggregated else 0
    name = f"disaggregated ({prefill}P+{cfg.pods - prefill}D)" if disaggregated else f"aggregated ({cfg.pods})"
    pods = PdPods(prefill=prefill, decode=cfg.pods - prefill, sim_args=cfg.sim_args,
                  decode_role="decode" if disaggregated else "both")
    with pods:
        # aggregated: EPP's default configuration over the same pods, labelled "both"
        epp_args = pods.epp_args() if disaggregated else ["--static-endpoints-file", str(pods.endpoints_file)]
        with LocalStack(sim_endpoints=pods.endpoints, epp_args=epp_args) as stack:
            log(f"{name}: {cfg.rate:g} req/s for {cfg.duration:g} s ...")
            recs, wall = await run_load(stack.url, plan(cfg))
            return summarize(name, cfg.pods, recs, wall, await _remote_prefills(pods))


def render(rows: list[dict[str, Any]]) -> str:
    ms = {"digits": 0, "scale": 1000}
    return table([[r["config"], str(r["pods"]), str(r["requests"]), str(r["errors"]),
                   fmt(r["ttft_long_p50"], **ms), fmt(r["ttft_long_p99"], **ms), fmt(r["ttft_short_p50"], **ms),
                   fmt(r["ttft_short_p99"], **ms), fmt(r["itl_p50"], 1, 1000), fmt(r["itl_p99"], 1, 1000),
                   fmt(r["itl_short_p99"], 1, 1000), fmt(r["out_tokens_per_s"]), str(r["remote_prefills"])]
                  for r in rows], HEADER, align_left=1) + "\n(latencies in ms; ITL = gap between streamed tokens)"


async def run_bench(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    rows = [await run_config(cfg, False, log), await run_config(cfg, True, log)]
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "rows": rows}
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "pd.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pd", description=__doc__.splitlines()[0])
    d = BenchConfig()
    ap.add_argument("--pods", type=int, default=d.pods)
    ap.add_argument("--prefill", type=int, default=d.prefill, help="prefill pods of the disaggregated run")
    ap.add_argument("--rate", type=float, default=d.rate)
    ap.add_argument("--duration", type=float, default=d.duration)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--long-share", type=float, default=d.long_share)
    ap.add_argument("--profile", default="pressure", help="simulator profile")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not 0 < args.prefill < args.pods:
        ap.error("--prefill must leave at least one decode pod")
    cfg = BenchConfig(pods=args.pods, prefill=args.prefill, rate=args.rate, duration=args.duration, seed=args.seed,
                      long_share=args.long_share, sim_args=sim_args(args.profile), out=args.out)
    result = asyncio.run(run_bench(cfg))
    print(render(result["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
