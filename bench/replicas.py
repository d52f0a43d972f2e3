"""Routing with several EPPs behind one Envoy: does N route as well as one? (issue 13, items 2 and 3)

``python -m bench.replicas`` runs the shared-prefix workload through one Envoy whose ext_proc cluster holds N EPP
replicas (round robin per stream; ``--mode workers``: one EPP with ``--workers N`` on one port), for N in
``--replicas`` (1, 2, 4), with the shared store (a real redis-server) and without it, then once more with the
store killed halfway through the run. It prints the prefix-cache hit rate the pods report and TTFT, each beside
the single EPP's, and the errors (there must be none: a dead store costs routing quality, never a request).

    python -m bench.replicas                       # replicas 1, 2, 4; with and without the store; store kill
    python -m bench.replicas --mode workers --replicas 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import new_session
from bench.harness import SimPods, Target
from bench.quality import QualityConfig, _sim_args, run_one
from epp.stack.envoy import EnvoyProcess, EnvoySpec
from epp.stack.local import HOST, LocalStack, free_port
from epp.stack.redis import RedisProcess, server_binary

WORKLOAD = "shared-prefix"
HIT_TOLERANCE = 0.05  # relative to one EPP's hit rate (issue 13's target)
P90_TOLERANCE = 0.10


@dataclass
class ReplicasConfig:
    replicas: list[int] = field(default_factory=lambda: [1, 2, 4])
    mode: str = "replicas"  # or "workers"
    store: list[bool] = field(default_factory=lambda: [True, False])
    kill_store: bool = True  # one more run at the largest N with the store killed halfway
    sync_interval: str = "50ms"
    quality: QualityConfig = field(default_factory=lambda: QualityConfig(
        pods=4, rate=8.0, duration=20.0, warmup=4.0, plots=False, quiet=True,
        workload_kw={WORKLOAD: {"groups": 12, "system_tokens": 3000, "question_tokens": (100, 200),
                                "output_tokens": (50, 100), "text": "natural"}}))
    out: Path | None = None


def store_args(store_url: str | None, sync_interval: str, run: int) -> list[str]:
    """EPP's shared-store flags for the ``run``-th fleet: a key namespace of its own, so that each fleet starts on an
    empty store. The runs share one redis-server, and each starts on pods whose prefix caches were just reset
    (bench.quality.run_one): the picks earlier fleets left in the store's stream, which a starting EPP reads to
    start warm, name blocks no pod holds any more. Read, they route each group's first request to a pod predicted
    to hold its prefix, the miss lowers that pod's horizon in the prefix index (cachedTokensFeedback), and real
    entries stop matching for the rest of the run (issue 13: 2 workers with the store at 88.9% hits, 95.0%
    without; "picks shared" counted the earlier runs' picks: 483 = 2 x 161 old + 161 live)."""
    if not store_url:
        return []
    return ["--state-store-url", store_url, "--state-store-sync-interval", sync_interval,
            "--state-store-namespace", f"bench-replicas-{run}"]


class EppFleet(Target):
    """N EPPs behind one Envoy: N processes on N ports (``replicas``) or one with ``--workers N`` (``workers``)."""

    def __init__(self, endpoints: list[str], n: int, mode: str, store_url: str | None, sync_interval: str,
                 run: int = 0) -> None:
        self.n, self.mode = n, mode
        self.name = f"{mode}={n}{' +store' if store_url else ''}"
        self.description = f"Envoy + {n} EPP {mode}" + (" sharing state through Redis" if store_url else "")
        args = store_args(store_url, sync_interval, run)
        if mode == "workers":
            self.stacks = [LocalStack(sim_endpoints=endpoints, tls=False, epp_args=[*args, "--workers", str(n)])]
        else:
            self.stacks = [LocalStack(sim_endpoints=endpoints, tls=False, epp_args=args) for _ in range(n)]
        self.endpoints = endpoints

    def start(self) -> None:
        for s in self.stacks:
            s.start_epp()
        first, *rest = self.stacks
        self.envoy = EnvoyProcess(EnvoySpec(
            listen_port=free_port(), admin_port=free_port(), extproc_port=first.grpc_port,
            more_extproc_ports=[s.grpc_port for s in rest], endpoints=self.endpoints, extproc_tls=False))
        self.envoy.start()
        self.envoy.wait_extproc_healthy()
        self.url = self.envoy.url

    def stop(self) -> None:
        self.envoy.stop()
        for s in self.stacks:
            s.cleanup()

    def pids(self) -> dict[str, int]:
        out = {f"epp{i}": s.epp_pid for i, s in enumerate(self.stacks) if s.epp_pid}
        assert self.envoy.proc is not None
        return {**out, "envoy": self.envoy.proc.pid}

    async def store_stats(self, http: aiohttp.ClientSession) -> dict[str, float]:
        """Summed over the fleet: the store's sync errors and the picks exchanged."""
        total: dict[str, float] = {}
        for s in self.stacks:
            async with http.get(f"http://{HOST}:{s.metrics_port}/metrics") as r:
                text = await r.text()
            for line in text.splitlines():
                for key in ("epp_state_store_sync_errors_total", "epp_state_store_prefix_received_total"):
                    if line.startswith(key + "{"):
                        total[key] = total.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return total


async def run_fleet(cfg: ReplicasConfig, pods: SimPods, http: aiohttp.ClientSession, n: int, store: RedisProcess | None,
                    kill: bool = False, run: int = 0) -> dict[str, Any]:
    fleet = EppFleet(pods.endpoints, n, cfg.mode, store.url if store else None, cfg.sync_interval, run)
    try:
        await asyncio.to_thread(fleet.start)
        killer = None
        if kill and store is not None:
            async def kill_halfway() -> None:
                await asyncio.sleep(cfg.quality.duration / 2)
                store.kill()
            killer = asyncio.create_task(kill_halfway())
        run = await run_one(fleet, WORKLOAD, pods, http, cfg.quality)
        if killer is not None:
            await killer
        run["n"], run["mode"], run["store"], run["store_killed"] = n, cfg.mode, store is not None, kill
        run["store_stats"] = await fleet.store_stats(http)
        return run
    finally:
        await asyncio.to_thread(fleet.stop)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


HEADER = ["mode", "EPPs", "store", "reqs", "errors", "hit %", "hit vs 1", "TTFT p50", "p90", "p90 vs 1",
          "picks shared", "verdict"]


def table(runs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    ref = next((r for r in runs if r["n"] == 1 and not r["store"]), runs[0])["summary"]
    rows, verdicts = [], []
    for r in runs:
        s = r["summary"]
        hit, p90 = s["hit_rate"], s["ttft_p90"]
        dhit = (hit / ref["hit_rate"] - 1) if hit is not None and ref["hit_rate"] else None
        dp90 = (p90 / ref["ttft_p90"] - 1) if p90 is not None and ref["ttft_p90"] else None
        errors = round(s["error_pct"] * s["requests"] / 100)  # every request, warm-up included
        store = "killed" if r["store_killed"] else ("yes" if r["store"] else "no")
        if r["store_killed"]:
            verdict = "ok: no request lost" if errors == 0 else f"FAIL: {errors} lost"
        elif r["n"] == 1:
            verdict = "reference" if not r["store"] else ""
        elif r["store"]:
            good = (dhit is not None and abs(dhit) <= HIT_TOLERANCE and dp90 is not None and dp90 <= P90_TOLERANCE)
            verdict = "ok" if good and errors == 0 else "MISSED"
        else:
            verdict = "what no store costs"
        rows.append([r["mode"], str(r["n"]), store, str(s["requests"]), str(errors), _pct(hit),
                     "-" if dhit is None else f"{100 * dhit:+.1f}%", _ms(s["ttft_p50"]), _ms(p90),
                     "-" if dp90 is None else f"{100 * dp90:+.1f}%",
                     str(int(r.get("store_stats", {}).get("epp_state_store_prefix_received_total", 0))), verdict])
        if verdict.startswith(("MISSED", "FAIL")):
            verdicts.append(f"{r['mode']}={r['n']} store={store}: {verdict}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines), verdicts


async def run_replicas(cfg: ReplicasConfig) -> dict[str, Any]:
    binary = server_binary(install=True)
    if binary is None and any(cfg.store):
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    q = cfg.quality
    out_dir = cfg.out or Path(f"/tmp/epp-bench-replicas-{int(time.time())}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pods = SimPods(q.pods, _sim_args(q), out_dir).start()
    store = RedisProcess(free_port(), binary=binary).start() if binary else None
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        async with new_session() as http:
            plan = [(1, False)] + [(n, s) for n in cfg.replicas for s in cfg.store if (n, s) != (1, False)]
            for n, with_store in plan:
                runs.append(await run_fleet(cfg, pods, http, n, store if with_store else None, run=len(runs)))
                if not q.quiet:
                    print(f"  {cfg.mode}={n} store={with_store}: done", file=sys.stderr)
            if cfg.kill_store and store is not None:
                runs.append(await run_fleet(cfg, pods, http, max(cfg.replicas), store, kill=True, run=len(runs)))
    finally:
        if store is not None:
            store.stop()
        pods.stop()
    text, verdicts = table(runs)
    (out_dir / "runs.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "requests"} for r in runs], indent=1, default=str))
    (out_dir / "table.txt").write_text(text + "\n")
    return {"runs": runs, "table": text, "verdicts": verdicts, "out_dir": str(out_dir),
            "wall_s": time.monotonic() - t0}


def parse_args(argv: list[str] | None) -> ReplicasConfig:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", default="1,2,4", help="EPP counts to compare (default %(default)s)")
    ap.add_argument("--mode", choices=["replicas", "workers"], default="replicas")
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs without the store")
    ap.add_argument("--no-kill", action="store_true", help="skip the run that kills the store halfway")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--pods", type=int, default=4)
    ap.add_argument("--sync-interval", default="50ms")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = ReplicasConfig(replicas=sorted({int(x) for x in a.replicas.split(",")}), mode=a.mode,
                         store=[True] if a.no_baseline else [True, False], kill_store=not a.no_kill,
                         sync_interval=a.sync_interval, out=a.out)
    q = cfg.quality
    q.rate, q.duration, q.pods, q.seed, q.quiet = a.rate, a.duration, a.pods, a.seed, False
    return cfg


def main(argv: list[str] | None = None) -> int:
    result = asyncio.run(run_replicas(parse_args(argv)))
    print()
    print(result["table"])
    for line in result["verdicts"]:
        print(line)
    print(f"\nraw data: {result['out_dir']}  ({result['wall_s']:.0f} s)")
    return 1 if any(v for v in result["verdicts"] if "FAIL" in v) else 0


if __name__ == "__main__":
    sys.exit(main())
