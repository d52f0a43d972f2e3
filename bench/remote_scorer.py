"""Per-request cost of a remote scorer: the same sequential requests through Envoy + EPP with queue-scorer alone,
then with remote-scorer (examples/remote-scorer/server.py on loopback) added. Prints a table.

    python -m bench.remote_scorer [--requests 300]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

from epp.stack.local import HOST, LocalStack, ManagedProcess, free_port
from epp.stack.tour import MODEL

SERVER = Path(__file__).resolve().parents[1] / "examples" / "remote-scorer" / "server.py"
HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
LOCAL = HEAD + "plugins:\n- type: queue-scorer\n"
REMOTE = HEAD + """plugins:
- type: remote-scorer
  parameters: {{address: "{address}", timeout: 50ms}}
- type: queue-scorer
"""


def run(config: str, n: int, endpoints: list[str]) -> tuple[list[float], str]:
    with LocalStack(sim_endpoints=endpoints, epp_args=["--config-text", config]) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
        out = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            if i >= 20:  # warm-up excluded
                out.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
        return out, httpx.get(f"http://{HOST}:{s.metrics_port}/metrics", timeout=5).text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    n = ap.parse_args().requests
    pods = LocalStack(pods=3, sim_args=["--profile", "fast", "--model", MODEL, "--step-fixed-ms", "0"])
    port = free_port()
    server = ManagedProcess("remote-scorer", [sys.executable, str(SERVER), "--host", HOST, "--port", str(port)],
                            pods.dir)
    try:
        pods.start_sim()
        server.start()
        server.wait_for_log("remote scorer ready", 30)
        rows = []
        for name, cfg in (("queue-scorer", LOCAL), ("+ remote-scorer", REMOTE.format(address=f"{HOST}:{port}"))):
            lat, metrics = run(cfg, n, pods.endpoints)
            q = statistics.quantiles(lat, n=100)
            m = re.search(r'^epp_remote_scorer_seconds_sum\{plugin="remote-scorer"\} (\S+)', metrics, re.M)
            k = re.search(r'^epp_remote_scorer_seconds_count\{plugin="remote-scorer"\} (\S+)', metrics, re.M)
            call = f"{float(m[1]) / float(k[1]) * 1000:.2f}" if m and k and float(k[1]) else "-"
            rows.append((name, statistics.mean(lat), q[49], q[98], call))
        print(f"{'configuration':<18}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}{'remote call ms':>16}")
        for name, mean, p50, p99, call in rows:
            print(f"{name:<18}{mean:>9.2f}{p50:>9.2f}{p99:>9.2f}{call:>16}")
        print(f"added per request: mean {rows[1][1] - rows[0][1]:+.2f} ms, p50 {rows[1][2] - rows[0][2]:+.2f} ms "
              f"({n} sequential requests, loopback)")
    finally:
        server.stop()
        pods.cleanup()


if __name__ == "__main__":
    main()
