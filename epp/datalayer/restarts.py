"""Model-server restarts, seen in the scraped metrics.

A pod that restarts at the same address comes back with an empty KV cache, and nothing else tells EPP: the
pool keeps the endpoint (same name, same address) and the scrapes resume. What EPP believed the endpoint
cached (the prefix indexes) is then wrong until misses correct it. The restart shows on the metrics page:

* a monotonic counter goes backwards (every counter of a new process starts at 0): per engine, a few counters
  that grow with any traffic (``RESTART_COUNTERS``); each series is compared with the same series (same
  labels) at the last successful scrape, however long ago that was (a scrape gap does not matter);
* ``process_start_time_seconds`` (prometheus_client's process collector, on vLLM's page unless it runs in
  multiprocess mode) moves later by more than ``START_SLACK``.

Absent families and series are no signal either way: a page that lacks them (another engine, a vLLM without
prefix caching) never looks like a restart. A process restarted that served more than its predecessor before
EPP scraped it again, on a page without a start time, goes unseen: misses still correct the index then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from epp.datalayer.promtext import Sample

PROCESS_START = "process_start_time_seconds"
START_SLACK = 1.0  # s: a start time moving less than this (or backwards) is a clock adjustment, not a new process

# Counters that grow with any traffic, by engine name (the samples' names, ``_total`` included). Few: each costs
# ~7 us of parsing per scrape, and they all grow with the same traffic (prompt tokens: every vLLM version has it;
# prefix-cache queries: vLLM V1's, the first thing a request does).
RESTART_COUNTERS: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total"),
    "sglang": ("sglang:prompt_tokens_total", "sglang:generation_tokens_total"),
}

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def restart_families(engine: str) -> tuple[str, ...]:
    """The families to read from an engine's page for restart detection."""
    return (*RESTART_COUNTERS.get(engine, ()), PROCESS_START)


def read_signals(families: Mapping[str, Sequence[Sample]], engine: str) -> tuple[dict[SeriesKey, float], float | None]:
    """The restart counters found on a parsed page (series -> value) and the process start time, if any."""
    counters: dict[SeriesKey, float] = {}
    for name in RESTART_COUNTERS.get(engine, ()):
        for s in families.get(name, ()):
            counters[(name, tuple(sorted(s.labels.items())))] = s.value
    start = families.get(PROCESS_START)
    return counters, (start[0].value if start else None)


class RestartDetector:
    """One endpoint's restart signals as of its last successful scrape."""

    __slots__ = ("counters", "started")

    def __init__(self) -> None:
        self.counters: dict[SeriesKey, float] = {}
        self.started: float | None = None

    def observe(self, counters: Mapping[SeriesKey, float], started: float | None) -> str | None:
        """Compare a successful scrape's signals with the previous one's; the reason when the server restarted
        in between, else None. The first scrape of an endpoint has nothing to compare with."""
        reason = None
        if started is not None and self.started is not None and started > self.started + START_SLACK:
            reason = f"{PROCESS_START} {self.started:.0f} -> {started:.0f}"
        else:
            for key, value in counters.items():
                old = self.counters.get(key)
                if old is not None and value < old:  # NaN compares false: no signal
                    reason = f"{key[0]} {old:g} -> {value:g}"
                    break
        # This scrape's series only: after a restart, none of the old process's values may linger to be compared
        # with a series the new process creates later.
        self.counters = dict(counters)
        if started is not None:
            self.started = started
        return reason
