"""The scheduling benchmark runs (small numbers): CI catches a broken benchmark, not a slow one."""

from __future__ import annotations

from bench.scheduling_bench import VARIANTS, format_table, main, run_bench


def test_scheduling_bench_smoke(capsys):
    rows = run_bench(endpoints=(2, 5), prompt_tokens=512, decisions=5)
    assert [(r["variant"], r["endpoints"]) for r in rows] == [(v, n) for v in VARIANTS for n in (2, 5)]
    for r in rows:
        assert r["schedule_mean"] > 0 and r["schedule_p50"] <= r["schedule_p99"]
        assert r["blocks"] == 32 and r["index_blocks"] > 0  # 512 tokens / 16 per block; the index was warmed
    table = format_table(rows)
    assert "text/512" in table and len(table.splitlines()) == 2 + len(rows)
    main(["--endpoints", "3", "--prompt-tokens", "256", "--decisions", "3", "--variants", "ids"])
    assert "ids" in capsys.readouterr().out
