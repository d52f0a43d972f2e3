"""Prefill/decode disaggregation: the handler, the deciders, the role filters, the header on the pick."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.director import Director
from epp.extproc.protocol import LB_NAMESPACE, PREFILLER_HEADER
from epp.observability.hooks import RequestHooks
from epp.observability.metrics import EppMetrics
from epp.scheduling.config import load_config
from epp.scheduling.registry import PluginConfigError
from tests.extproc_helpers import body_msg, drive, headers_msg, new_stream, response_headers_msg, set_headers
from tests.scorers_helpers import HEAD, eps, plugin, req
from tests.unit.test_filters import LABELLED, run

EXAMPLE = Path(__file__).resolve().parents[2] / "manifests/examples/pd-disaggregation.yaml"
LONG = "the quick brown fox jumps over the lazy dog " * 400  # ~17k characters, ~4k tokens
SHORT = "hi there"


def pool_of(roles: list[str | None]) -> EndpointPool:
    pool = EndpointPool()
    pool.sync([EndpointSpec(f"{role or 'plain'}-{i}", f"10.0.0.{i + 1}", 8000,
                            {"llm-d.ai/role": role} if role else {}) for i, role in enumerate(roles)])
    for e in pool.endpoints:
        e.metrics.updated_at = time.monotonic()
    return pool


def director(roles: list[str | None], text: str | None = None, hooks: bool = False) -> Director:
    pool = pool_of(roles)
    metrics = EppMetrics(pool) if hooks else None
    return Director(pool, load_config(text or EXAMPLE.read_text(), pool), metrics=metrics,
                    hooks=RequestHooks(pool, metrics) if hooks else None)


def chat(text: str, stream: bool = False) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                       "stream": stream}).encode()


async def pick(d: Director, text: str, headers: dict[str, str] | None = None):
    s = new_stream(d)
    out = await drive(s, [headers_msg("/v1/chat/completions", headers), body_msg(chat(text))])
    return s, out[0]


# -- filters ------------------------------------------------------------------------------------------------

def test_role_filters_follow_llm_d():
    assert run(plugin("prefill-filter"), eps(*LABELLED)) == ["e1"]
    assert run(plugin("decode-filter"), eps(*LABELLED)) == ["e0", "e2", "e3"]  # unlabelled pods decode
    with pytest.raises(PluginConfigError, match="unknown parameter"):
        plugin("decode-filter", "{label: x}")


# -- the pick -----------------------------------------------------------------------------------------------

async def test_long_prompt_is_split_short_prompt_is_not():
    d = director(["prefill", "decode", "decode"], hooks=True)
    s, resp = await pick(d, LONG)
    headers = set_headers(resp)
    decision = s.decision
    assert decision.primary.name.startswith("decode-")  # the request goes to the decode pod
    assert decision.result.prefill.name == "prefill-0"
    assert headers[PREFILLER_HEADER] == "10.0.0.1:8000"
    assert headers["x-gateway-destination-endpoint"] == decision.primary.hostport
    lb = resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields
    assert lb[PREFILLER_HEADER].string_value == "10.0.0.1:8000"
    record = d.hooks.decisions.recent(1)[0]
    assert record["pd"]["decision"] == "prefill-decode" and record["pd"]["prefill_dest"] == "10.0.0.1:8000"
    assert record["endpoint"] == decision.primary.name
    assert d.pool.get("prefill-0").inflight_requests == 1  # busy until the decode pod's answer starts
    s.receive(response_headers_msg())
    assert d.pool.get("prefill-0").inflight_requests == 0

    s, resp = await pick(d, SHORT)
    assert PREFILLER_HEADER not in set_headers(resp) and s.decision.result.prefill is None
    assert d.hooks.decisions.recent(1)[0]["pd"]["reason"] == "below-non-cached-tokens"
    text = d.metrics.registry.get_sample_value
    assert text("epp_pd_decisions_total", {"decision_type": "prefill-decode"}) == 1
    assert text("epp_pd_decisions_total", {"decision_type": "decode-only"}) == 1
    assert text("epp_prefill_decisions_total", {"endpoint": "prefill-0"}) == 1


async def test_prompt_cached_on_the_decode_pod_is_not_split_again():
    d = director(["prefill", "decode"])
    s, _ = await pick(d, LONG)
    assert s.decision.result.prefill is not None
    s, _ = await pick(d, LONG + " and one more question")  # the decode pod holds (pulled) the prefix now
    assert s.decision.result.prefill is None and s.decision.result.disagg["reason"] == "below-non-cached-tokens"


async def test_no_prefill_pod_means_decode_alone():
    d = director(["decode", "both", None])
    s, resp = await pick(d, LONG)
    assert s.decision.result.disagg == {"decision": "decode-only", "reason": "no-prefill-endpoint",
                                        "prompt_tokens": s.decision.result.disagg["prompt_tokens"],
                                        "uncached_tokens": s.decision.result.disagg["uncached_tokens"]}
    assert PREFILLER_HEADER not in set_headers(resp)
    # a prefill pod that stopped answering is not a candidate either
    d = director(["prefill", "decode"])
    d.pool.get("prefill-0").metrics.unreachable = True
    s, _ = await pick(d, LONG)
    assert s.decision.result.prefill is None and s.decision.primary.name == "decode-1"


async def test_client_sent_prefiller_header_never_goes_upstream():
    d = director(["prefill", "decode"])
    forged = {PREFILLER_HEADER: "10.9.9.9:80"}
    _, resp = await pick(d, SHORT, forged)
    mutation = resp.request_headers.response.header_mutation
    assert PREFILLER_HEADER in mutation.remove_headers and PREFILLER_HEADER not in set_headers(resp)
    _, resp = await pick(d, LONG, forged)  # overwritten with EPP's pick
    assert set_headers(resp)[PREFILLER_HEADER] == "10.0.0.1:8000"
    assert PREFILLER_HEADER not in resp.request_headers.response.header_mutation.remove_headers


# -- deciders -----------------------------------------------------------------------------------------------

PD_CONFIG = HEAD + """plugins:
- {type: prefill-filter}
- {type: decode-filter}
- {type: max-score-picker}
- {type: DECIDER, name: decider, parameters: PARAMS}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: decider}}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""


def pd_config(decider: str, params: str = "{}") -> str:
    return PD_CONFIG.replace("DECIDER", decider).replace("PARAMS", params)


@pytest.mark.parametrize(("decider", "params", "text", "split"), [
    ("always-disagg-pd-decider", "{}", SHORT, True),
    ("prefix-based-pd-decider", "{}", LONG, False),  # nonCachedTokens 0: disabled, as llm-d
    ("prefix-based-pd-decider", "{nonCachedTokens: 16}", LONG, True),  # no prefix plugin: all uncached
    ("prefix-based-pd-decider", "{nonCachedTokens: 16}", "x" * 400, False),  # 100 tokens: transfer costs more
    ("prefix-based-pd-decider", "{nonCachedTokens: 16, kvTransferFixedTokens: 0}", "x" * 400, True),
    ("prefix-based-pd-decider", "{nonCachedTokens: 16, promptTokens: 100000}", LONG, False),
])
async def test_deciders(decider, params, text, split):
    d = director(["prefill", "decode"], pd_config(decider, params))
    s, resp = await pick(d, text)
    assert (s.decision.result.prefill is not None) is split
    assert (PREFILLER_HEADER in set_headers(resp)) is split


def test_config_mistakes_are_named():
    with pytest.raises(PluginConfigError, match="not a prefill decider"):
        load_config(pd_config("max-score-picker").replace("- {type: max-score-picker}\n", ""))
    with pytest.raises(PluginConfigError, match="no scheduling profile named 'prefill'"):
        load_config(pd_config("always-disagg-pd-decider").replace(
            "- {name: prefill, plugins: [{pluginRef: prefill-filter}]}\n", ""))
    with pytest.raises(PluginConfigError, match="encode stage"):
        load_config(pd_config("always-disagg-pd-decider").replace("{prefill: decider}", "{encode: decider}"))
    with pytest.raises(PluginConfigError, match="kvTransferTokenCost"):
        load_config(pd_config("prefix-based-pd-decider", "{kvTransferTokenCost: 2}"))


def test_prefix_scorer_in_both_profiles_indexes_both_pods():
    d = director(["prefill", "decode"])
    r = req(LONG)
    result = d.config.scheduler.schedule(r, d.pool.endpoints)
    assert result.prefill is not None and result.endpoints[0].name == "decode-1"
    for obs in d.observers:
        obs.pre_request(r, result)
    producer = d.config.plugins["prefix-cache-scorer"].prefix_producer()
    st = producer.state(req(LONG, rid="again"), d.pool.endpoints)
    assert all(producer.match_all(st, d.pool.endpoints))  # both pods hold the prompt now
