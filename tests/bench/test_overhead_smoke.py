"""CI smoke for ``python -m bench.overhead``: both response_body_modes, a handful of requests and a short
ramp. Checks that the tables come out and that nothing errored; no timing assertions."""

from __future__ import annotations

from bench.overhead import render, run_overhead


async def test_overhead_benchmark_produces_its_tables() -> None:
    result = await run_overhead(pods=2, n_plain=8, n_stream=2, prompt_tokens=100, step_seconds=0.4,
                                max_concurrency=4, log=lambda *a: None, large_bytes=20_000, large_concurrency=4,
                                large_seconds=0.8, large_phases=1, large_rounds=1, large_pod_delay_ms=100)

    assert set(result["modes"]) == {"FULL_DUPLEX_STREAMED", "NONE"}
    for mode, res in result["modes"].items():
        assert res["plain"]["errors"] == 0 and res["stream"]["errors"] == 0, mode
        assert res["plain"]["e2e_p50_gateway"] > 0
        assert res["stream"]["ttft_p50_gateway"] > 0
        assert res["ramp"] and all(step["errors"] == 0 and step["requests"] > 0 for step in res["ramp"])
        assert res["ramp"][0]["cpu_pct"]["epp"] >= 0
        for case in ("large", "large_delayed", "large_burst"):
            assert res[case]["errors"] == 0 and res[case]["ttft_p50_gateway"] > 0, (mode, case)
        assert res["large"]["cpu_ms_per_req_gateway"]["epp"] >= 0
    assert result["baseline_ramp"]
    text = render(result)
    assert "Targets" in text and "peak req/s" in text
    assert "FULL_DUPLEX_STREAMED" in text and "NONE" in text and "Envoy baseline (no EPP)" in text
