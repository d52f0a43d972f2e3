"""The selective Prometheus text parser against prometheus_client's general parser, and selectors."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.scrape_bench import VLLM_FAMILIES, general_parse, render_vllm_page
from epp.datalayer.promtext import Sample, Selector, SelectorError, parse


def _key(samples):
    """Order-insensitive, NaN-safe comparable form of a sample list."""
    return sorted((s.name, tuple(sorted(s.labels.items())), repr(float(s.value))) for s in samples)


def _general(text: str) -> dict[str, list]:
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def page() -> str:
    return render_vllm_page()


@pytest.mark.parametrize("grouped", [True, False])
def test_every_family_of_a_vllm_page_matches_prometheus_client(page, grouped):
    lines = page.count("\n")
    assert 180 <= lines <= 320  # realistic size: histograms, counters, info gauges, process collectors
    general = _general(page)
    assert "vllm:e2e_request_latency_seconds" in general and "vllm:prompt_tokens" in general
    res = parse(page, general, suffixes=True, grouped=grouped)
    assert res.errors == 0 and res.error is None
    assert set(res.families) == {name for name, samples in general.items() if samples}
    for name, samples in general.items():
        assert _key(res.get(name)) == _key(samples), name


def test_only_the_asked_families_and_exact_names_by_default(page):
    res = parse(page, VLLM_FAMILIES)
    # every asked family the page has (vllm:engine_sleep_state appears only with sleep mode enabled)
    assert set(res.families) == {f for f in VLLM_FAMILIES if f"\n{f}{{" in page or f"\n{f} " in page}
    assert len(res.families) >= len(VLLM_FAMILIES) - 1
    assert res.families["vllm:num_requests_waiting"] == [
        Sample("vllm:num_requests_waiting", {"engine": "0", "model_name": "meta-llama/Llama-3.1-8B-Instruct"}, 3.0)]
    # without suffixes a histogram family has no samples of its own; its series are asked by full name
    assert parse(page, ["vllm:e2e_request_latency_seconds"]).families == {}
    buckets = parse(page, ["vllm:e2e_request_latency_seconds_bucket"]).get("vllm:e2e_request_latency_seconds_bucket")
    assert len(buckets) == 22 and buckets[-1].labels["le"] == "+Inf"
    assert general_parse(page, VLLM_FAMILIES).families == res.families


def test_unasked_lines_are_never_read():
    text = ("garbage {{{ not a metric\nfoo_bar{x=\"unterminated 1\nfoo_total 9\nfoox 3\n"
            "# HELP foo a foo\n# TYPE foo gauge\nfoo{a=\"1\"} 1\nfoo 2 1700000000000\n")
    res = parse(text, ["foo"])
    assert res.errors == 0
    assert res.get("foo") == [Sample("foo", {"a": "1"}, 1.0), Sample("foo", {}, 2.0, 1700000000000)]
    assert parse(text, ["foo"], suffixes=True).get("foo")[0] == Sample("foo_total", {}, 9.0)


ESCAPED = (
    '# TYPE m gauge\n'
    'm{path="C:\\\\dir\\\\",quote="say \\"hi\\", ok",nl="a\\nb",comma="a,b",brace="}{",eq="x=\\"y\\""} 1.5\n'
    'm{ a = "spaced" , b="trailing",} -2\n'
    'm{empty=""} +Inf\n'
    'm{x="nan"} NaN\n'
    'm{x="neg"} -Inf 1700000000123\n'
    'm{x="exp"} 1.5e-3\n'
    'm{x="utf8",model="modèle/🚀"} 7\n'
)


def test_escapes_special_values_and_timestamps_match_prometheus_client():
    ours = parse(ESCAPED, ["m"])
    assert ours.errors == 0
    assert _key(ours.get("m")) == _key(_general(ESCAPED)["m"])
    s = ours.get("m")
    assert s[0].labels == {"path": "C:\\dir\\", "quote": 'say "hi", ok', "nl": "a\nb", "comma": "a,b",
                           "brace": "}{", "eq": 'x="y"'}
    assert s[1].labels == {"a": "spaced", "b": "trailing"}
    assert s[2].value == math.inf and math.isnan(s[3].value)
    assert s[4].value == -math.inf and s[4].timestamp_ms == 1700000000123
    assert s[5].value == 0.0015 and s[6].labels["model"] == "modèle/🚀"


def test_garbage_never_raises_and_good_lines_survive():
    text = ("m{a=\"1\"} 1\n"
            "m{a=\"2\" 2\n"  # unterminated block
            "m{a=\"3} 3\n"  # unterminated value
            "m{a=3} 3\n"  # unquoted value
            "m{=\"x\"} 3\n"  # empty label name
            "m{a=\"4\"}\n"  # no value
            "m{a=\"5\"} five\n"
            "m{a=\"6\"} 6 7 8\n"  # extra token
            "m{a=\"7\"} 1_000\n"
            "m{a=\"8\"} 8 1.5\n"  # fractional timestamp
            "m{a=\"9\"} 9\n")
    res = parse(text, ["m"], grouped=False)
    assert [s.labels["a"] for s in res.get("m")] == ["1", "9"]
    assert res.errors == 9 and res.error and res.error.startswith("m: ")
    for junk in ("", "\n\n", "<html><body>500</body></html>", "\x00\xff\xfe" * 100, "m", "m{", "m{a=\"", "#m 1"):
        res = parse(junk, ["m"], suffixes=True)
        assert res.families == {}
    assert parse(b"\xff\xfem 1\nm{a=\"\xc3\xa9\"} 2", ["m"]).get("m")[0].labels == {"a": "é"}


def test_line_positions_and_line_endings():
    assert parse("m 1", ["m"]).get("m") == [Sample("m", {}, 1.0)]  # first line, no trailing newline
    assert [s.value for s in parse("x 0\r\nm 1\r\nm{a=\"b\"} 2\r\n", ["m"]).get("m")] == [1.0, 2.0]
    assert parse("x 0\nm\t3\n", ["m"]).get("m") == [Sample("m", {}, 3.0)]
    # a longer name sharing the prefix is another family, before or after ours
    text = "m_bucket_x 5\nm_sum 1\nm 2\nm_count 3\nm_created 9\nmm 4\n"
    assert [s.value for s in parse(text, ["m"]).get("m")] == [2.0]
    assert [s.value for s in parse(text, ["m"], suffixes=True).get("m")] == [1.0, 2.0, 3.0]


def test_grouped_mode_reads_one_group_and_tolerates_comments_inside_it():
    text = "m{a=\"1\"} 1\n# a comment\nm{a=\"2\"} 2\nother 0\nm{a=\"3\"} 3\n"
    assert [s.value for s in parse(text, ["m"]).get("m")] == [1.0, 2.0]
    assert [s.value for s in parse(text, ["m"], grouped=False).get("m")] == [1.0, 2.0, 3.0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=4, unique=True),
       number=st.floats(allow_nan=False))
def test_label_values_round_trip_through_prometheus_client(values, number):
    reg = CollectorRegistry()
    g = Gauge("rt_metric", "doc with \\ and \n newline", ["v", "w"], registry=reg)
    for i, v in enumerate(values):
        g.labels(v, f"{i},\"{v}\"").set(number)
    text = generate_latest(reg).decode()
    res = parse(text, ["rt_metric"])
    assert res.errors == 0
    assert sorted((s.labels["v"], s.labels["w"]) for s in res.get("rt_metric")) == sorted(
        (v, f"{i},\"{v}\"") for i, v in enumerate(values))
    assert all(s.value == number for s in res.get("rt_metric"))


# ------------------------------------------------------------------------------------------- selectors


def test_selector_syntax():
    assert Selector.parse("vllm:num_requests_waiting") == Selector("vllm:num_requests_waiting")
    unquoted = Selector.parse("nv_trt_llm_request_metrics{request_type=waiting}")
    assert unquoted == Selector("nv_trt_llm_request_metrics", (("request_type", "waiting"),))
    assert Selector.parse(' m { b = "x,y" , a=1, } ') == Selector("m", (("a", "1"), ("b", "x,y")))
    assert Selector.parse('m{a="q\\"uote"}').labels == (("a", 'q"uote'),)
    assert Selector.parse("m{a='single'}").labels == (("a", "single"),)
    assert Selector.parse("m{}") == Selector("m")
    assert str(Selector.parse('m{b=2,a="x\\"y"}')) == 'm{a="x\\"y",b="2"}'
    assert Selector.parse(str(Selector.parse('m{a="x\\"y"}'))) == Selector.parse('m{a="x\\"y"}')
    for bad in ("", "  ", "9m", "m{", "m{a}", "m{a=}", "m{a!=b}", "m{a=~b}", 'm{a="x}', "m{a=b c}", "m}{",
                "m{1a=b}", "my metric"):
        with pytest.raises(SelectorError):
            Selector.parse(bad)


def test_selector_matching_and_latest():
    sel = Selector.parse("m{t=waiting}")
    samples = [Sample("m", {"t": "scheduled"}, 1), Sample("m", {"t": "waiting", "model": "x"}, 2),
               Sample("m_total", {"t": "waiting"}, 3), Sample("m", {"t": "waiting"}, 4)]
    assert [s.value for s in sel.select(samples)] == [2, 4]
    assert sel.latest(samples).value == 2  # no timestamps: first in page order (GIE)
    stamped = [Sample("m", {"t": "waiting"}, 5, 100), Sample("m", {"t": "waiting"}, 6, 300),
               Sample("m", {"t": "waiting"}, 7, 200)]
    assert sel.latest(stamped).value == 6
    assert Selector.parse("m{t=none}").latest(samples) is None
