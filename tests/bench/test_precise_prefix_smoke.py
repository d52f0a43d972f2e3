"""CI smoke for ``python -m bench.precise_prefix``: a few thousand events, a small index, short prompts. Checks
that every figure comes out and the table renders; no timing assertions."""

from __future__ import annotations

from bench.precise_prefix import render, run


def test_precise_prefix_benchmark_produces_its_tables() -> None:
    r = run(events=2000, blocks=20_000, sizes=(500, 2000))
    assert r["events"] == 2000 and r["local_eps"] > 0
    assert r["zmq_eps"] and r["zmq_eps"] > 0  # every event reached the index through ZMQ
    assert 0 < r["bytes_per_block"] < 10_000
    assert [t["tokens"] >= n for t, n in zip(r["tokenize"], (500, 2000), strict=True)] == [True, True]
    assert all(t["cold_ms"] > 0 and t["warm_ms"] > 0 for t in r["tokenize"])
    text = render(r)
    assert "events/s" in text and "MiB per 1M blocks" in text and "tokenize warm ms" in text


async def test_quality_epp_precise_target(tmp_path) -> None:
    """``--targets epp-precise``: the pods publish KV events, EPP runs the shipped precise-prefix.yaml with the
    pods' tokenizer; every request is served and EPP's prediction audit comes back."""
    import pytest

    pytest.importorskip("zmq")
    from bench.quality import run_quality, suite_config

    tiny = {"system_tokens": 200, "question_tokens": (10, 20), "output_tokens": (4, 4), "groups": 2}
    cfg = suite_config(pods=2, sim_profile="fast", workloads=["p-mixed-apis"], targets=["epp-precise"],
                       duration=1.5, warmup=0.3, drain=20.0, rate_scale=0.3, seeds=[1], out=tmp_path, quiet=True,
                       plots=False, workload_kw={"p-mixed-apis": tiny})
    result = await run_quality(cfg)
    assert result["meta"]["failures"] == []
    (run,) = result["runs"]
    assert not [r["error"] for r in run["requests"] if r["error"]]
    assert run["summary"]["ok"] == run["summary"]["measured"] > 0
    assert "--kv-events" in result["meta"]["sim_args"]["p-mixed-apis"]
    assert run["summary"].get("audit", {}).get("predictions")
