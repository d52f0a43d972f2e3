"""Hypothesis profiles for the property-based and fuzz tests, and a count of the cases that ran.

``EPP_FUZZ_PROFILE`` picks the profile: ``ci`` (default: 150 cases per test, well under a minute in
all), ``deep`` (20,000 per test, for long runs: about an hour), ``dev`` (a quick look);
``EPP_FUZZ_EXAMPLES`` overrides the number of cases per test. Example::

    EPP_FUZZ_PROFILE=deep EPP_FUZZ_EXAMPLES=3000 .venv/bin/pytest tests/fuzz -q -p no:cacheprovider

Every test counts its cases with ``tests.fuzz.counting.count``; the totals are printed at the end.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.fuzz.counting import COUNTS

_COMMON = {
    "deadline": None,  # a loaded 2-core CI box makes per-example timing meaningless
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,  # no .hypothesis directory in the tree; failures print a reproduction blob
    "print_blob": True,
}
settings.register_profile("ci", max_examples=150, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("deep", max_examples=20_000, **_COMMON)
settings.load_profile(os.environ.get("EPP_FUZZ_PROFILE", "ci"))
if os.environ.get("EPP_FUZZ_EXAMPLES"):
    settings.register_profile("custom", settings(max_examples=int(os.environ["EPP_FUZZ_EXAMPLES"])))
    settings.load_profile("custom")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COUNTS:
        return
    profile = os.environ.get("EPP_FUZZ_PROFILE", "ci")
    terminalreporter.section(f"fuzz cases run (hypothesis profile {profile!r})")
    width = max(len(name) for name in COUNTS)
    for name, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{name:<{width}}  {n:>8}")
    terminalreporter.write_line(f"{'total':<{width}}  {sum(COUNTS.values()):>8}")
