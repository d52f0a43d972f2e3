"""Wake: a sleeping model and 20 concurrent first requests, through Envoy + EPP at ``http://<envoy>/<model>/v1``.

    python -m bench.wake                  # about half a minute
    python -m bench.wake --requests 50 --wake-ms 600 --wake2-ms 2000

Two models, one simulator process each (vLLM sleep mode; waking takes ``--wake-ms`` from level 1, weights in CPU
RAM, and ``--wake2-ms`` from level 2, weights discarded), sharing one accelerator that holds one model at a time.
Scenarios, each ``--requests`` streamed chat completions sent at once:

* ``warm``: model A awake: the baseline;
* ``level-1``: A asleep at level 1;
* ``level-2``: A asleep at level 2;
* ``evict``: B asleep and A awake on the full accelerator: A (least recently used) drains and sleeps, then B wakes.

The table: answers (200 / other), wakes (the pod's own count, and EPP's ``epp_wakes_total``), TTFT p50 / p99 /
max and the wall time. Every request of a scenario should get 200 after exactly one wake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.client import Planned, Result, new_session, send
from bench.report import fmt, pct, table
from bench.soak import metric_sum, read_metrics
from epp.stack.models import ModelServers, MultiModelStack

A, B = "model-a", "model-b"
NODE = {"epp.io/accelerator": "node-1", "epp.io/accelerator-budget": "1"}
SCENARIOS = ("warm", "level-1", "level-2", "evict")
HEADER = ["scenario", "requests", "200", "other", "pod wakes", "EPP wakes", "TTFT p50 ms", "TTFT p99 ms",
          "TTFT max ms", "wall ms"]


@dataclass
class WakeConfig:
    requests: int = 20
    wake_ms: float = 600.0  # from level 1 (weights in CPU RAM)
    wake2_ms: float = 2000.0  # from level 2 (weights reloaded)
    max_tokens: int = 16

    def sim_args(self) -> list[str]:
        return ["--profile", "fast", "--wake-latency-ms", f"{self.wake_ms:g}",
                "--wake-latency-level2-ms", f"{self.wake2_ms:g}"]


def _body(model: str, i: int, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": True,
                       "messages": [{"role": "user", "content": f"first request {i}"}]}).encode()


async def _burst(url: str, model: str, cfg: WakeConfig) -> tuple[list[Result], float]:
    async with new_session() as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(send(http, f"{url}/{model}", Planned(i, 0.0, "chat",
                                                                             _body(model, i, cfg.max_tokens)), t0, 60)
                                         for i in range(cfg.requests)))
        return list(results), time.perf_counter() - t0


def run_wake(cfg: WakeConfig, log: Any = print) -> list[dict[str, Any]]:
    rows = []
    with MultiModelStack([ModelServers(A, 1, [NODE]), ModelServers(B, 1, [NODE])], cfg.sim_args()) as rig:
        pod_a, pod_b = rig.pods[A][0], rig.pods[B][0]
        rig.sleep(pod_b)  # the accelerator holds A
        for scenario in SCENARIOS:
            target = B if scenario == "evict" else A
            pod = rig.pods[target][0]
            if scenario in ("level-1", "level-2"):
                rig.sleep(pod_a, level=int(scenario[-1]))
            wakes, epp_wakes = rig.sim_state(pod)["wakes"], _epp_wakes(rig)
            results, wall = asyncio.run(_burst(rig.url, target, cfg))
            ttft = [r.ttft for r in results if r.ok and r.ttft is not None]
            row = {"scenario": scenario, "requests": len(results), "ok": sum(r.ok for r in results),
                   "pod_wakes": rig.sim_state(pod)["wakes"] - wakes, "epp_wakes": _epp_wakes(rig) - epp_wakes,
                   "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "ttft_max": max(ttft, default=None),
                   "wall": wall, "errors": sorted({r.error or str(r.status) for r in results if not r.ok})}
            if scenario == "evict":
                row["evicted_level"] = rig.sim_state(pod_a)["level"]
            log(f"{scenario}: {row['ok']}/{row['requests']} ok, {row['pod_wakes']} wake(s), wall {wall:.2f}s")
            rows.append(row)
    return rows


def _epp_wakes(rig: MultiModelStack) -> float:
    assert rig.stack is not None
    return metric_sum(read_metrics(rig.stack.metrics_port), "epp_wakes_total", result="success")


def render(rows: list[dict[str, Any]]) -> str:
    out = [[r["scenario"], str(r["requests"]), str(r["ok"]), str(r["requests"] - r["ok"]), str(r["pod_wakes"]),
            f"{r['epp_wakes']:g}", fmt(r["ttft_p50"], 0, 1000), fmt(r["ttft_p99"], 0, 1000),
            fmt(r["ttft_max"], 0, 1000), fmt(r["wall"], 0, 1000)] for r in rows]
    notes = [f"{r['scenario']}: errors {r['errors']}" for r in rows if r["errors"]]
    return "\n".join([table(out, HEADER, align_left=1), *notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wake", description=__doc__.split("\n\n")[0])
    d = WakeConfig()
    ap.add_argument("--requests", type=int, default=d.requests)
    ap.add_argument("--wake-ms", type=float, default=d.wake_ms, help="wake latency from sleep level 1")
    ap.add_argument("--wake2-ms", type=float, default=d.wake2_ms, help="wake latency from sleep level 2")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    a = ap.parse_args(argv)
    rows = run_wake(WakeConfig(a.requests, a.wake_ms, a.wake2_ms, a.max_tokens),
                    log=lambda *x: print(*x, file=sys.stderr))
    print(render(rows))
    expected = {"warm": 0, "level-1": 1, "level-2": 1, "evict": 1}
    return 0 if all(r["ok"] == r["requests"] and r["pod_wakes"] == expected[r["scenario"]] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
