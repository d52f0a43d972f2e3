"""CI smoke for ``python -m bench.worker_spread``: one small stack (``--workers 2`` behind GIE's Envoy); it runs,
prints its line and no request fails; no assertion on the spread (tests/e2e/test_workers.py checks that)."""

from __future__ import annotations

from bench.worker_spread import main


def test_worker_spread_runs(capsys) -> None:
    assert main(["--workers", "2", "--requests", "24", "--concurrency", "6", "--max-tokens", "4", "--pods", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("stack 0: requests per worker [") and "'200': 24" in line
