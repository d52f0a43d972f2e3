"""How ``epp --workers N`` spreads Envoy's ext_proc streams over its workers (issue 13, item 2).

Starts simulated pods, ``epp --workers N`` and a real Envoy with GIE's standard configuration (an HTTP/2 ext_proc
cluster, FULL_DUPLEX_STREAMED, TLS), sends ``--requests`` streamed chat completions at ``--concurrency``, and
prints the requests each worker handled (``inference_objective_request_total`` by ``worker`` on the supervisor's
``/metrics``) with the ext_proc connections each holds. ``--stacks`` repeats it on fresh stacks: how streams split
depends on how connections were placed, which can differ from one start to the next.

    python -m bench.worker_spread --workers 2 --requests 300 --concurrency 32 --stacks 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from epp.stack.local import HOST, LocalStack
from epp.stack.tour import MODEL

SIM_ARGS = ["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "5"]


def per_worker(text: str, name: str) -> dict[str, float]:
    """``name``'s samples summed by their ``worker`` label."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'worker="' in line:
            labels, value = line[len(name):].rsplit(" ", 1)
            worker = labels.split('worker="', 1)[1].split('"', 1)[0]
            out[worker] = out.get(worker, 0.0) + float(value)
    return out


async def drive(url: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, int]:
    """``requests`` streamed chat completions, ``concurrency`` at a time; counts by outcome."""
    outcomes: dict[str, int] = {}
    queue = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def one(i: int) -> None:
            body = {"model": MODEL, "stream": True, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"request {i}: say something"}]}
            try:
                async with http.post(f"{url}/v1/chat/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=60)) as r:
                    async for _ in r.content:
                        pass
                    key = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                key = type(e).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

        async def lane() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return outcomes


async def run_stack(workers: int, requests: int, concurrency: int, max_tokens: int, epp_args: list[str],
                    pods: int) -> dict[str, Any]:
    stack = LocalStack(pods=pods, sim_args=SIM_ARGS, envoy_profile="gie",
                       epp_args=["--workers", str(workers), *epp_args])
    try:
        await asyncio.to_thread(stack.start)
    except Exception:
        print(stack.epp.tail(20000) if stack.epp else "", file=sys.stderr)
        stack.cleanup()
        raise
    try:
        t0 = time.monotonic()
        outcomes = await drive(stack.url, requests, concurrency, max_tokens)
        wall = time.monotonic() - t0
        async with aiohttp.ClientSession() as http, http.get(f"http://{HOST}:{stack.metrics_port}/metrics") as r:
            text = await r.text()
        stats = stack.envoy.admin_get("/stats?filter=^cluster.ext_proc.upstream_cx_total$") or ""  # type: ignore[union-attr]
        counts = per_worker(text, "inference_objective_request_total")
        conns = per_worker(text, "epp_extproc_connections")
        aged = per_worker(text, "epp_extproc_connections_aged_total")
        refused = per_worker(text, "epp_extproc_streams_refused_total")
        return {"requests": {w: int(counts.get(str(w), 0)) for w in range(workers)},
                "connections": {w: int(conns.get(str(w), 0)) for w in range(workers)},
                "aged": int(sum(aged.values())), "refused": int(sum(refused.values())),
                "envoy_connections": int(stats.rsplit(" ", 1)[-1] or 0) if stats else 0,
                "outcomes": outcomes, "wall_s": round(wall, 1)}
    finally:
        await asyncio.to_thread(stack.cleanup)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_spread", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens per answer (5 ms each on the pods)")
    ap.add_argument("--stacks", type=int, default=1, help="fresh stacks to run, one after another")
    ap.add_argument("--pods", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the runs as JSON too")
    a, epp_args = ap.parse_known_args(argv)  # anything else goes to epp (e.g. --grpc-max-concurrent-streams=0)
    runs = []
    for i in range(a.stacks):
        run = asyncio.run(run_stack(a.workers, a.requests, a.concurrency, a.max_tokens, epp_args, a.pods))
        runs.append(run)
        reqs = run["requests"]
        share = " ".join(f"{100 * reqs[w] / max(1, sum(reqs.values())):.0f}%" for w in sorted(reqs))
        print(f"stack {i}: requests per worker {list(reqs.values())} ({share}), open ext_proc connections "
              f"{list(run['connections'].values())} (Envoy opened {run['envoy_connections']}, "
              f"{run['aged']} aged, {run['refused']} streams refused), "
              f"outcomes {run['outcomes']}, {run['wall_s']} s", flush=True)
    if a.json:
        print(json.dumps(runs))
    lost = sum(n for run in runs for k, n in run["outcomes"].items() if k != "200")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
