"""A short soak (bench/soak.py) in CI: sustained mixed load through Envoy + EPP, nothing lost, EPP's
memory, file descriptors and threads flat. The full run is ``python -m bench.soak`` (10 minutes)."""

from __future__ import annotations

import asyncio
import os

from bench.soak import SIM_ARGS, soak
from epp.stack.local import LocalStack

DURATION = float(os.environ.get("EPP_SOAK_SECONDS", "25"))


def test_short_soak_loses_nothing_and_stays_flat():
    with LocalStack(pods=3, sim_args=SIM_ARGS) as stack:
        assert stack.epp_pid is not None
        report = asyncio.run(soak(stack.url, stack.metrics_port, stack.epp_pid, DURATION, concurrency=16,
                                  sample_every=2.0))
    print("\n" + "\n".join(report.lines()))
    assert report.sent > 100, report.lines()
    assert report.lost == 0 and report.errors == 0, report.error_samples
    assert report.ok > 0 and report.expected_errors > 0 and report.abandoned > 0  # every path exercised
    # EPP's own counters agree with what the clients sent: nothing routed twice, nothing dropped silently.
    assert report.epp_routed == report.sent - report.by_kind["bad"], report.lines()
    assert report.epp_refused == report.by_kind["bad"], report.lines()
    assert not any(report.inflight_end.values())
    # Flat: generous bounds (a loaded 2-core box, a short run), a leak per request would still cross them.
    assert report.rss_growth_after_warmup_mib < 48, report.lines()
    assert report.fds_end <= report.fds_start + 8, report.lines()
    assert report.threads_end <= report.threads_start + 4, report.lines()
    assert report.tasks_end is not None and report.tasks_start is not None
    assert report.tasks_end <= report.tasks_start + 4, report.lines()  # no task left behind per request
    # Python objects: a leak of a few objects per request (thousands of requests) would cross 20%.
    assert report.py_blocks_end is not None and report.py_blocks_after_warmup is not None
    assert report.py_blocks_end < 1.2 * report.py_blocks_after_warmup, report.lines()
