"""CI smoke for ``python -m bench.pd``: both configurations for a few seconds on the fast profile. Checks the
table and that the disaggregated run did split requests; no latency assertions."""

from __future__ import annotations

from bench.pd import HEADER, BenchConfig, render, run_bench
from epp.stack.tour import MODEL


async def test_pd_bench_runs_both_configurations(tmp_path) -> None:
    cfg = BenchConfig(rate=3.0, duration=3.0, long_share=0.5, sim_args=["--profile", "fast", "--model", MODEL],
                      out=tmp_path)
    result = await run_bench(cfg, log=lambda *a: None)
    aggregated, disaggregated = result["rows"]
    assert aggregated["requests"] == disaggregated["requests"] > 0
    assert aggregated["errors"] == disaggregated["errors"] == 0
    assert aggregated["remote_prefills"] == 0 and disaggregated["remote_prefills"] > 0
    text = render(result["rows"])
    assert all(h in text for h in HEADER) and (tmp_path / "pd.json").exists()
