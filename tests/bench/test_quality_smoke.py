"""CI smoke for ``python -m bench.quality``: every workload against every target, a few seconds each, tiny
prompts on fast pods. Checks that the table comes out and that nothing errored; no timing assertions."""

from __future__ import annotations

import json

import pytest

from bench.harness import TARGETS, vllm_router_binary
from bench.quality import HEADER, QualityConfig, run_quality
from bench.workloads import WORKLOADS

SMALL = {
    "shared-prefix": {"groups": 3, "system_tokens": 300, "question_tokens": (10, 30), "output_tokens": (4, 8)},
    "mixed-apis": {"groups": 3, "system_tokens": 300, "question_tokens": (10, 30), "output_tokens": (4, 8)},
    "multi-turn": {"users": 4, "groups": 2, "system_tokens": 200, "question_tokens": (10, 30),
                   "output_tokens": (4, 8), "max_turns": 3},
    "unique": {"prompt_tokens": (50, 150), "output_tokens": (4, 8)},
}


async def test_quality_benchmark_runs_every_workload_against_every_target(tmp_path) -> None:
    targets = [t for t in TARGETS if not t.startswith("vllm-router") or vllm_router_binary()]
    if len(targets) < len(TARGETS):
        pytest.skip("vllm-router is not installed (pip install 'epp[bench]')")
    cfg = QualityConfig(pods=2, sim_profile="fast", num_gpu_blocks=512, rate=6.0, duration=1.5, warmup=0.3,
                        drain=20.0, workload_kw=SMALL, out=tmp_path, quiet=True, targets=targets)
    result = await run_quality(cfg)

    assert len(result["runs"]) == len(WORKLOADS) * len(targets)
    for run in result["runs"]:
        s = run["summary"]
        assert s["requests"] > 0, run["workload"]
        assert s["error_pct"] == 0, (run["workload"], run["target"], s["errors_sample"])
        assert s["ok"] == s["measured"], (run["workload"], run["target"])
        assert s["hit_rate"] is not None
        apis = {r["api"] for r in run["requests"]}
        if run["workload"] == "mixed-apis":
            assert len(apis) >= 4, apis  # a tiny sample still spans most APIs
    lines = result["table"].splitlines()
    assert lines[0].split()[:3] == HEADER[:3]
    assert len(lines) == 2 + len(result["runs"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["requests"][0]["ttft"] is not None
    assert (tmp_path / "ttft_cdf.png").stat().st_size > 0 and (tmp_path / "hit_rate.png").stat().st_size > 0


async def test_a_config_file_is_a_target(tmp_path) -> None:
    from epp.scheduling.config import DEFAULT_CONFIG

    config = tmp_path / "ratio.yaml"
    config.write_text(DEFAULT_CONFIG.replace("- type: prefix-cache-scorer",
                                             "- type: prefix-cache-scorer\n  parameters: {scoreMode: ratio}"))
    cfg = QualityConfig(pods=2, sim_profile="fast", num_gpu_blocks=512, rate=6.0, duration=1.5, warmup=0.3,
                        drain=20.0, workload_kw=SMALL, out=tmp_path / "out", quiet=True, plots=False,
                        workloads=["shared-prefix"], targets=[f"epp:{config}"])
    result = await run_quality(cfg)
    (run,) = result["runs"]
    assert run["target"] == "epp-ratio" and run["summary"]["error_pct"] == 0
    assert result["meta"]["targets"] == {"epp-ratio": f"Envoy + EPP ({config})"}
