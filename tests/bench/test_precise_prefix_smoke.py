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
