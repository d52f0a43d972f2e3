"""CI smoke for ``python -m bench.quality --suite pressure``: two of its workloads on two pod settings (so the pods
restart between them), scaled down to seconds, against round robin, EPP and the two event/tree-based peers.
Checks the per-workload tables and verdicts come out and nothing errored; no timing assertions."""

from __future__ import annotations

import pytest

from bench.harness import sglang_router_installed, vllm_router_binary
from bench.quality import SUITE_HEADER, run_quality, suite_config

TINY = {"system_tokens": 200, "question_tokens": (10, 20), "output_tokens": (4, 4)}


async def test_pressure_suite_smoke(tmp_path) -> None:
    pytest.importorskip("zmq")
    if not vllm_router_binary() or not sglang_router_installed():
        pytest.skip("vllm-router / sglang-router not installed (pip install 'epp[bench]')")
    targets = ["envoy-rr", "epp-default", "vllm-router-kv-aware", "sglang-router"]
    cfg = suite_config(pods=2, sim_profile="fast", workloads=["p-mixed-apis", "p-zipf-capped"], targets=targets,
                       duration=1.5, warmup=0.3, drain=20.0, rate_scale=0.3, seeds=[1], out=tmp_path, quiet=True,
                       plots=False, workload_kw={"p-mixed-apis": {**TINY, "groups": 2},
                                                 "p-zipf-capped": {**TINY, "groups": 4}})
    result = await run_quality(cfg)

    assert result["meta"]["failures"] == []
    assert len(result["runs"]) == 2 * len(targets)
    for run in result["runs"]:
        s = run["summary"]
        assert s["requests"] > 0 and s["hit_rate"] is not None
        failed = {(r["api"], r["error"]) for r in run["requests"] if r["error"]}
        if run["target"] == "sglang-router" and run["workload"] == "p-mixed-apis":
            # sglang-router 0.3.2 routes neither Anthropic's /v1/messages nor vLLM's /inference/v1/generate
            assert failed <= {("messages", "HTTP 404: "), ("generate", "HTTP 404: ")}, failed
        else:
            assert not failed, (run["workload"], run["target"], failed)
            assert s["ok"] == s["measured"]
    # the capped workload ran on pods restarted with --max-num-seqs 16
    assert "--max-num-seqs" in result["meta"]["sim_args"]["p-zipf-capped"]
    i = result["meta"]["sim_args"]["p-zipf-capped"].index("--max-num-seqs")
    assert result["meta"]["sim_args"]["p-zipf-capped"][i + 1] == "16"
    text = result["table"]
    assert text.count(SUITE_HEADER[0]) == 2 and "p-mixed-apis: " in text and "p-zipf-capped: " in text
    assert [v.split(":")[0] for v in result["verdicts"]] == ["p-mixed-apis", "p-zipf-capped"]
    assert all("best peer" in v and "vs envoy-rr" in v for v in result["verdicts"])
    if any(r["summary"]["error_pct"] > 1 for r in result["runs"] if r["target"] == "sglang-router"):
        assert "not counted as best peer: sglang-router" in result["verdicts"][0]
    assert (tmp_path / "table.md").read_text().count("### ") == 2
