"""The fast /metrics renderer says exactly what prometheus_client would say for the same families."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp_sim.config import SimConfig
from epp_sim.engine import Engine
from epp_sim.metrics import PodMetrics
from epp_sim.tokenizer import PseudoTokenizer


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_renderer_matches_prometheus_client() -> None:
    cfg = SimConfig(profile="instant", lora_adapters=["a"], served_model_names=['odd "name"\\x'],
                    legacy_metrics=True)
    e = Engine(cfg.resolved(), PseudoTokenizer())
    e.start()
    try:
        reqs = [e.submit(list(range(1000, 1100 + i)), 5 + i, lora="a" if i % 2 else None) for i in range(4)]
        async with asyncio.timeout(5):
            for r in reqs:
                while not r.finished:
                    await r.wait(r.max_tokens)
        m = PodMetrics(e)
        ours = samples(m.render().decode())
        theirs = samples(generate_latest(m.registry).decode())
        lora = "vllm:lora_requests_info"
        assert {k: v for k, v in ours.items() if k[0] != lora} == {k: v for k, v in theirs.items() if k[0] != lora}
        assert {k for k in ours if k[0] == lora} == {k for k in theirs if k[0] == lora}
        assert ours[("vllm:generation_tokens_total", (("engine", "0"), ("model_name", 'odd "name"\\x')))] == 26
    finally:
        await e.stop()
