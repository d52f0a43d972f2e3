"""Write a workload's requests as a trace for ``epp replay`` (epp/trace.py): the arrivals and bodies bench.quality
sends for the same workload, seed, rate and duration, and a description of the pods it runs them on.

    python -m bench.trace p-zipf --seed 1 --out p-zipf.jsonl                 # what the pressure suite sends
    python -m bench.trace p-zipf --seed 1 --duration 600 --out p-zipf-10min.jsonl
    epp replay p-zipf.jsonl --config-name epp-default --config-name gie-default

Only workloads whose requests are known in advance: a multi-turn turn carries the previous answer, which exists
once a pod has produced it; record those live with ``epp --record-trace`` instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench import workloads as wl
from bench.client import API_PATHS
from bench.quality import PRESSURE_DURATION, QualityConfig
from epp.trace import header_line, record_line

_HEADERS = {"content-type": "application/json"}
_ANTHROPIC_HEADERS = {**_HEADERS, "anthropic-version": "2023-06-01"}


def write_trace(name: str, out: Path, seed: int = 1, rate: float | None = None, duration: float | None = None,
                **kw: Any) -> int:
    """Write workload ``name`` (a suite workload or one of WORKLOADS) to ``out``; returns the request count."""
    spec = next((w for suite in wl.SUITES.values() for w in suite if w.name == name), None)
    d = QualityConfig()
    if spec is not None:  # the pressure suite's pods (bench/quality.py suite_config)
        rate = spec.rate if rate is None else rate
        duration = duration or spec.duration or PRESSURE_DURATION
        sim = {"pods": 8, "profile": "pressure", "num_gpu_blocks": spec.num_gpu_blocks,
               "max_num_seqs": spec.max_num_seqs, "tokenizer": "deepseek", "model": wl.MODEL}
    else:
        rate = d.rate if rate is None else rate
        duration = duration or d.duration
        sim = {"pods": d.pods, "profile": d.sim_profile, "num_gpu_blocks": d.num_gpu_blocks, "model": wl.MODEL}
    workload = wl.build(name, seed, rate, duration, **kw)
    if not isinstance(workload, wl.StaticWorkload):
        raise ValueError(f"{name}: its requests depend on the answers; record it live with epp --record-trace")
    with open(out, "w", encoding="utf-8") as f:
        f.write(header_line(source=f"bench.trace {name}", workload=name, seed=seed, params=workload.params, sim=sim))
        for planned in workload.planned:
            headers = _ANTHROPIC_HEADERS if planned.api == "messages" else _HEADERS
            f.write(record_line(planned.t, "POST", API_PATHS[planned.api], headers, planned.body))
    return len(workload.planned)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", help="a pressure-suite workload (p-zipf, ...) or one of " + ", ".join(wl.WORKLOADS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, help="requests/s (default: the workload's, as bench.quality)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals (default: as bench.quality)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        n = write_trace(a.workload, a.out, a.seed, a.rate, a.duration)
    except ValueError as e:
        ap.error(str(e))
    print(f"{a.out}: {n} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
