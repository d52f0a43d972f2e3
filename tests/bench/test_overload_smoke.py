"""CI smoke for ``python -m bench.overload``: one configuration, phases of a second or two. Checks the table,
the plot and the reconciliation with EPP's counters; no latency assertions."""

from __future__ import annotations

from bench.overload import HEADER, OverloadConfig, render, run_overload


async def test_overload_benchmark_produces_its_table_and_plot(tmp_path) -> None:
    cfg = OverloadConfig(pods=1, max_num_seqs=4, calibrate_s=1.5, configs=("flow-control",), out=tmp_path,
                         durations={"unloaded": 1.0, "2x": 2.0, "burst": 1.0, "after": 0.5})
    result = await run_overload(cfg, log=lambda *a: None)

    (run,) = result["runs"]
    assert run["capacity"] > 0 and run["reconciliation"]["reconciled"], run["reconciliation"]
    rows = run["rows"]
    assert {r["phase"] for r in rows} == {"unloaded", "2x", "burst", "after"}
    assert all(r["outcome"] == "ok" for r in rows if r["band"] == "interactive")  # the high band is served
    assert any(r["outcome"] == "429" for r in rows if r["band"] == "batch")  # the sheddable one is shed
    text = render(result)
    assert all(h in text for h in HEADER) and "reconciled with EPP's counters: yes" in text
    assert (tmp_path / "overload-ttft.png").stat().st_size > 0 and (tmp_path / "overload.json").exists()
