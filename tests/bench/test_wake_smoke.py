"""CI smoke for ``python -m bench.wake``: five requests per scenario, short wakes. Checks the table and that each
scenario's requests were all answered after exactly one wake (none when warm); no latency assertions."""

from __future__ import annotations

from bench.wake import HEADER, WakeConfig, render, run_wake


def test_wake_benchmark_serves_every_first_request_after_one_wake() -> None:
    rows = run_wake(WakeConfig(requests=5, wake_ms=100, wake2_ms=200, max_tokens=4), log=lambda *a: None)
    assert [r["scenario"] for r in rows] == ["warm", "level-1", "level-2", "evict"]
    assert all(r["ok"] == r["requests"] == 5 for r in rows), rows
    assert [r["pod_wakes"] for r in rows] == [0, 1, 1, 1] and [r["epp_wakes"] for r in rows] == [0, 1, 1, 1]
    assert rows[-1]["evicted_level"] == 1  # the accelerator holds one model: A slept for B
    text = render(rows)
    assert all(h in text for h in HEADER)
