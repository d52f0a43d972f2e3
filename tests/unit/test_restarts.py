"""Restart detection from scraped metrics (epp/datalayer/restarts.py): counters going backwards, a new process start
time; absent signals, growing counters and scrape gaps are no restart."""

from __future__ import annotations

from bench.scrape_bench import render_vllm_page
from epp.datalayer.engines import BUILTIN_ENGINES
from epp.datalayer.promtext import parse
from epp.datalayer.restarts import PROCESS_START, RestartDetector, read_signals, restart_families
from tests.unit.test_scraper import SGLANG_PAGE

PROMPT = ("vllm:prompt_tokens_total", (("engine", "0"), ("model_name", "m")))
QUERIES = ("vllm:prefix_cache_queries_total", (("engine", "0"), ("model_name", "m")))


def test_a_counter_going_backwards_is_a_restart():
    d = RestartDetector()
    assert d.observe({PROMPT: 100.0, QUERIES: 90.0}, None) is None  # first scrape: nothing to compare with
    assert d.observe({PROMPT: 150.0, QUERIES: 120.0}, None) is None
    reason = d.observe({PROMPT: 200.0, QUERIES: 0.0}, None)  # one counter going back is enough
    assert reason == "vllm:prefix_cache_queries_total 120 -> 0"
    assert d.observe({PROMPT: 203.0, QUERIES: 2.0}, None) is None  # compared with the last page's values now


def test_counters_that_only_grow_or_stand_still_are_no_restart():
    d = RestartDetector()
    for v in (0.0, 0.0, 5.0, 5.0, 6.0, 1e9):
        assert d.observe({PROMPT: v}, 1000.0) is None


def test_absent_counters_and_start_time_are_no_signal():
    d = RestartDetector()
    for _ in range(3):
        assert d.observe({}, None) is None  # an engine exposing none of them
    assert d.observe({PROMPT: 100.0}, None) is None
    assert d.observe({}, None) is None  # gone from one page
    assert d.observe({PROMPT: 40.0}, None) is None  # back: compared with nothing (no false restart)
    assert d.observe({PROMPT: 50.0, QUERIES: 10.0}, None) is None  # a series that appears
    other = (PROMPT[0], (("engine", "1"), ("model_name", "m")))  # another series of the family: its own history
    assert d.observe({PROMPT: 60.0, other: 1.0}, None) is None
    assert d.observe({PROMPT: 60.0, other: 0.0}, None) is not None


def test_a_scrape_gap_compares_with_the_last_successful_scrape():
    """Failed scrapes never reach the detector: the first page after an outage is compared with the last one
    before it, however long ago."""
    d = RestartDetector()
    d.observe({PROMPT: 1000.0}, None)
    assert d.observe({PROMPT: 1200.0}, None) is None  # an outage, then more traffic: the same process
    assert d.observe({PROMPT: 30.0}, None) == "vllm:prompt_tokens_total 1200 -> 30"  # an outage, a new process


def test_a_later_process_start_time_is_a_restart_even_with_higher_counters():
    d = RestartDetector()
    d.observe({PROMPT: 10.0}, 1_700_000_000.0)
    assert d.observe({PROMPT: 20.0}, 1_700_000_000.4) is None  # within START_SLACK: the same process
    assert d.observe({PROMPT: 30.0}, 1_699_999_000.0) is None  # moved back: a clock step, not a new process
    reason = d.observe({PROMPT: 5000.0}, 1_700_000_300.0)  # a new process that served more than the old one
    assert reason is not None and reason.startswith(PROCESS_START)


def test_signals_read_from_real_pages():
    """The families are read with the load metrics, in the same parse; what a page lacks is simply absent."""
    vllm = BUILTIN_ENGINES["vllm"]
    page = render_vllm_page()  # as prometheus_client renders vLLM's, process collector included
    counters, start = read_signals(parse(page, vllm.families | set(restart_families("vllm"))).families, "vllm")
    labels = (("engine", "0"), ("model_name", "meta-llama/Llama-3.1-8B-Instruct"))
    assert counters == {("vllm:prompt_tokens_total", labels): 912_345.0,
                        ("vllm:prefix_cache_queries_total", labels): 900_000.0}
    assert start is not None and start > 1e9
    sglang = BUILTIN_ENGINES["sglang"]
    assert read_signals(parse(SGLANG_PAGE, sglang.families | set(restart_families("sglang"))).families,
                        "sglang") == ({}, None)
    assert restart_families("trtllm-serve") == (PROCESS_START,)  # an engine without known counters: the start time
