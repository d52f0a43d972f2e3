"""The ext_proc exchange, driven with plain protobuf messages (GIE's hermetic cases, adapted)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from epp.admission.models import ModelPath
from epp.api.errors import EppError
from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.director import Decision
from epp.extproc.protocol import MAX_CHUNK
from epp.extproc.stream import ExtProcStream, Phase, StreamOptions
from epp.scheduling.plugins import ProfileResult, RequestObserver, ResponseInfo, SchedulingResult
from epp.scheduling.registry import register_plugin
from tests.extproc_helpers import (
    NONE,
    body_msg,
    body_of,
    drive,
    headers_msg,
    immediate,
    make_director,
    new_stream,
    response_body_msg,
    response_headers_msg,
    set_headers,
)

REQ = {"max_tokens": 100, "model": "my-model", "prompt": "test prompt", "temperature": 0}
SUBSET = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
THREE_PODS = [("p1", 3, 0.2), ("p2", 0, 0.1), ("p3", 10, 0.2)]


def pick_of(responses) -> str:
    first = responses[0]
    assert first.HasField("request_headers"), first
    headers = set_headers(first)
    md = first.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-gateway-destination-endpoint"]
    assert headers["x-gateway-destination-endpoint"] == md.string_value  # header and metadata agree
    assert first.request_headers.response.clear_route_cache
    return md.string_value


async def test_selects_lower_queue_and_kv_cache():
    body = json.dumps(REQ).encode()
    out = await drive(new_stream(make_director(THREE_PODS)),
                      [headers_msg(headers={"x-request-id": "test-request-id"}), body_msg(body)])
    assert pick_of(out) == "192.168.1.2:8000"
    assert body_of(out) == body  # forwarded byte for byte when nothing rewrote it
    assert out[-1].request_body.response.body_mutation.streamed_response.end_of_stream
    assert "x-request-id" not in set_headers(out[0])  # the client's id stays as it is


async def test_split_body_across_chunks_and_model_rewrite():
    body = json.dumps({**REQ, "model": "sql-lora-sheddable"}).encode()
    msgs = [headers_msg(headers={"x-gateway-model-name-rewrite": "sql-lora-1fdg3"}),
            body_msg(body[:30], eos=False), body_msg(body[30:], eos=False), body_msg(b"", eos=True)]
    out = await drive(new_stream(make_director([("p1", 4, 0.2), ("p2", 4, 0.85)]), trust_rewrite_header=True), msgs)
    assert pick_of(out) == "192.168.1.1:8000"
    forwarded = json.loads(body_of(out))
    assert forwarded["model"] == "sql-lora-1fdg3" and forwarded["prompt"] == "test prompt"
    assert set_headers(out[0])["content-length"] == str(len(body_of(out)))


async def test_rewritten_model_is_restored_in_the_response():
    body = json.dumps(REQ).encode()
    stream = new_stream(make_director(), trust_rewrite_header=True)
    await drive(stream, [headers_msg(headers={"x-gateway-model-name-rewrite": "target-x"}), body_msg(body)])
    out = await drive(stream, [response_headers_msg(), response_body_msg(b'{"id":"1","mod'),
                               response_body_msg(b'el":"target-x","usage":{}}', eos=True)])
    assert body_of(out, "response_body") == b'{"id":"1","model":"my-model","usage":{}}'


async def test_invalid_json_is_a_400_in_the_openai_envelope():
    out = await drive(new_stream(make_director()), [headers_msg(), body_msg(b"{no json")])
    status, headers, doc = immediate(out[0])
    assert status == 400 and headers["x-epp-error-reason"] == "invalid-json"
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"]


async def test_missing_model_is_a_400():
    out = await drive(new_stream(make_director()), [headers_msg(), body_msg(b'{"prompt":"hello world"}')])
    status, headers, doc = immediate(out[0])
    assert status == 400 and headers["x-epp-error-reason"] == "missing-model" and doc["error"]["param"] == "model"


async def test_anthropic_errors_use_the_anthropic_envelope():
    out = await drive(new_stream(make_director()), [headers_msg("/v1/messages"), body_msg(b"[1,2")])
    status, _, doc = immediate(out[0])
    assert status == 400 and doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("subset", "expected"), [
    (["192.168.1.1:8000", "192.168.1.2:8000", "192.168.1.3:8000"], "192.168.1.2:8000"),  # best of the subset
    (["192.168.1.3:8000"], "192.168.1.3:8000"),  # partial: the only allowed one despite its load
    ("192.168.1.3:8000,192.168.1.1:8000", "192.168.1.1:8000"),  # comma string form
    (["192.168.1.3"], "192.168.1.3:8000"),  # bare IP admits any port
])
async def test_subset_hint(subset, expected):
    md = {SUBSET: {SUBSET_KEY: subset}}
    out = await drive(new_stream(make_director(THREE_PODS)),
                      [headers_msg(metadata=md), body_msg(json.dumps(REQ).encode(), metadata=md)])
    assert pick_of(out) == expected


@pytest.mark.parametrize("subset", [["192.168.1.99:8000"], [], ["192.168.1.1:9999"]])
async def test_subset_hint_without_match_is_503(subset):
    md = {SUBSET: {SUBSET_KEY: subset}}
    msgs = [headers_msg(metadata=md), body_msg(json.dumps(REQ).encode())]
    out = await drive(new_stream(make_director(THREE_PODS)), msgs)
    status, headers, doc = immediate(out[0])
    assert status == 503 and headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"
    assert doc["error"]["type"] == "service_unavailable"


async def test_header_only_request_is_routed_at_once():
    out = await drive(new_stream(make_director(THREE_PODS)), [headers_msg("/v1/models", method="GET", eos=True)])
    assert len(out) == 1 and pick_of(out).startswith("192.168.1.")
    assert "content-length" not in set_headers(out[0])


async def test_no_endpoints_is_503():
    out = await drive(new_stream(make_director([])), [headers_msg(), body_msg(json.dumps(REQ).encode())])
    assert immediate(out[0])[0] == 503


async def test_request_id_generated_when_absent_and_forged_headers_overridden():
    forged = {"x-gateway-destination-endpoint": "127.0.0.1:19901", SUBSET_KEY: "10.0.0.1:80"}
    out = await drive(new_stream(make_director()), [headers_msg(headers=forged), body_msg(json.dumps(REQ).encode())])
    headers = set_headers(out[0])
    assert headers["x-gateway-destination-endpoint"] == "192.168.1.1:8000"
    assert len(headers["x-request-id"]) == 36
    assert SUBSET_KEY in out[0].request_headers.response.header_mutation.remove_headers


async def test_large_body_is_reemitted_in_chunks():
    body = json.dumps({**REQ, "prompt": "x" * 300_000}).encode()
    out = await drive(new_stream(make_director()), [headers_msg(), body_msg(body[:100_000], eos=False),
                                                    body_msg(body[100_000:], eos=True)])
    pieces = [r for r in out if r.HasField("request_body")]
    assert len(pieces) == -(-len(body) // MAX_CHUNK)
    assert all(len(r.request_body.response.body_mutation.streamed_response.body) <= MAX_CHUNK for r in pieces)
    assert [r.request_body.response.body_mutation.streamed_response.end_of_stream for r in pieces][-2:] == [False, True]
    assert body_of(out) == body


async def test_body_over_the_limit_is_413_even_before_it_ends():
    stream = new_stream(make_director(), max_body_bytes=1000)
    out = await drive(stream, [headers_msg(), body_msg(b"x" * 600, eos=False), body_msg(b"x" * 600, eos=False)])
    assert immediate(out[0])[0] == 413
    assert await drive(stream, [body_msg(b"x", eos=True)]) == []  # the stream is over; nothing more is sent
    out = await drive(new_stream(make_director(), max_body_bytes=1000),
                      [headers_msg(headers={"content-length": "5000"})])
    assert immediate(out[0])[0] == 413


@register_plugin("test-usage-recorder")
class UsageRecorder(RequestObserver):
    """Records what observers are told (registered like any outside plugin)."""

    def __init__(self) -> None:
        self.completed: list = []
        self.headers: list = []

    def on_response_headers(self, request, endpoint, response):
        self.headers.append((response.status, response.served_endpoint))

    def on_response_complete(self, request, endpoint, response):
        self.completed.append((endpoint.name, response.completed, response.usage))


RECORDER_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: test-usage-recorder
  name: rec
"""


async def test_sse_chunks_pass_through_in_order_and_usage_is_counted():
    director = make_director(config=RECORDER_CONFIG)
    stream = new_stream(director)
    await drive(stream, [headers_msg("/v1/completions"), body_msg(json.dumps({**REQ, "stream": True}).encode())])
    assert director.pool.endpoints[0].inflight_requests == 1
    chunks = [b'data: {}\n\n',
              b'data: {"usage":{"prompt_tokens":7,"total_tokens":17,"completion_tokens":10}}\ndata: [DONE]\n\n', b""]
    out = await drive(stream, [response_headers_msg(content_type="text/event-stream", served="192.168.1.1:8000")]
                      + [response_body_msg(c, eos=(i == 2)) for i, c in enumerate(chunks)])
    assert out[0].HasField("response_headers")
    bodies = [r.response_body.response.body_mutation.streamed_response for r in out[1:]]
    assert [b.body for b in bodies] == chunks and [b.end_of_stream for b in bodies] == [False, False, True]
    rec = director.config.plugins["rec"]
    assert rec.headers == [(200, "192.168.1.1:8000")]
    (_, completed, usage), = rec.completed
    assert completed and usage.prompt_tokens == 7 and usage.completion_tokens == 10
    assert director.pool.endpoints[0].inflight_requests == 0
    stream.close()
    assert len(rec.completed) == 1  # exactly once


async def test_without_response_bodies_the_stream_close_ends_the_request():
    director = make_director(config=RECORDER_CONFIG)
    stream = new_stream(director)
    await drive(stream, [headers_msg(response_body_mode=NONE), body_msg(json.dumps(REQ).encode()),
                         response_headers_msg()])
    assert director.pool.endpoints[0].inflight_requests == 1
    stream.close()
    assert director.pool.endpoints[0].inflight_requests == 0
    assert director.config.plugins["rec"].completed[0][1] is True


async def test_client_gone_before_the_response_still_completes_once():
    director = make_director(config=RECORDER_CONFIG)
    stream = new_stream(director)
    await drive(stream, [headers_msg(), body_msg(json.dumps(REQ).encode())])
    stream.close()
    stream.close()
    assert director.config.plugins["rec"].completed == [("a", False, None)]
    assert director.pool.endpoints[0].inflight_requests == 0


async def test_out_of_order_messages_are_ignored_not_fatal():
    stream = new_stream(make_director())
    assert await drive(stream, [body_msg(b"{}")]) == []  # body before headers
    out = await drive(stream, [headers_msg(), body_msg(json.dumps(REQ).encode()), body_msg(b"again")])
    assert pick_of(out) == "192.168.1.1:8000"


async def test_control_headers_from_an_untrusted_client_are_ignored():
    """By default the rewrite and objective headers are the client's, not the gateway's: ignored."""
    body = json.dumps(REQ).encode()
    director = make_director()
    director.objectives.priorities["critical"] = 10
    stream = new_stream(director)
    out = await drive(stream, [headers_msg(headers={"x-gateway-model-name-rewrite": "target-x",
                                                    "x-gateway-inference-objective": "critical"}), body_msg(body)])
    assert body_of(out) == body and stream.request.target_model == "my-model"
    assert stream.request.objective is None and stream.request.priority == 0
    trusted = new_stream(director, trust_objective_header=True, trust_rewrite_header=True)
    out = await drive(trusted, [headers_msg(headers={"x-gateway-model-name-rewrite": "t" * 300,
                                                     "x-gateway-inference-objective": "critical"}), body_msg(body)])
    assert body_of(out) == body  # a rewrite that is no model name (too long) is ignored even when trusted
    assert trusted.request.priority == 10


async def test_request_body_in_too_many_pieces_is_refused():
    msgs = [headers_msg()] + [body_msg(b" ", eos=False) for _ in range(20)]
    out = await drive(new_stream(make_director(), max_body_chunks=10), msgs)
    status, headers, _ = immediate(out[0])
    assert status == 413 and headers["x-epp-error-reason"] == "body-too-fragmented"


async def test_bodies_buffered_across_streams_share_one_budget():
    from epp.extproc.stream import BodyBudget

    budget = BodyBudget(100)
    director = make_director()
    first = new_stream(director, budget=budget)
    await drive(first, [headers_msg(), body_msg(b"x" * 80, eos=False)])
    assert budget.used == 80
    out = await drive(new_stream(director, budget=budget), [headers_msg(), body_msg(b"y" * 40, eos=False)])
    status, headers, doc = immediate(out[0])
    assert status == 503 and headers["x-epp-error-reason"] == "body-buffer-full" and "error" in doc
    first.close()  # a stream that ends mid-body gives its bytes back
    assert budget.used == 0
    out = await drive(new_stream(director, budget=budget), [headers_msg(), body_msg(json.dumps(REQ).encode())])
    assert pick_of(out) and budget.used == 0  # parsed bodies are released


async def test_request_id_is_bounded_where_epp_keeps_it():
    stream = new_stream(make_director())
    await drive(stream, [headers_msg(headers={"x-request-id": "r" * 5000}), body_msg(json.dumps(REQ).encode())])
    assert stream.request.request_id == "r" * 128


async def test_empty_post_to_a_json_api_is_refused_with_the_request_id():
    out = await drive(new_stream(make_director()), [headers_msg(path="/v1/messages", eos=True,
                                                                headers={"x-request-id": "req-7"})])
    status, headers, doc = immediate(out[0])
    assert status == 400 and headers["x-epp-error-reason"] == "empty-body"
    assert doc["type"] == "error" and doc["request_id"] == "req-7" and headers["x-request-id"] == "req-7"
    out = await drive(new_stream(make_director()), [headers_msg(path="/v1/chat/completions"), body_msg(b"{x")])
    status, headers, doc = immediate(out[0])
    assert status == 400 and doc["requestId"] == headers["x-request-id"] and len(doc["requestId"]) == 36
    out = await drive(new_stream(make_director()), [headers_msg(path="/v1/models", method="GET", eos=True)])
    assert pick_of(out)  # a GET without a body is routed


# -- the stream alone: a fake director (no scheduler, pool or admission), a fixed clock and id source ----------


class FakeDirector:
    """A ``StreamDirector`` that picks one fixed endpoint (or refuses with ``refuse``) and records each call."""

    def __init__(self, refuse: EppError | None = None) -> None:
        self.endpoint = Endpoint("e", "10.0.0.9", 8000)
        self.refuse = refuse
        self.calls: list[tuple[Any, ...]] = []

    def note_response_body_mode(self, sends_bodies: bool) -> None:
        self.calls.append(("body_mode", sends_bodies))

    def model_path(self, path: str) -> ModelPath | None:
        return ModelPath("m", "served-m", path[2:]) if path.startswith("/m/") else None

    def model_status(self, route: ModelPath) -> dict[str, Any]:
        self.calls.append(("status", route))
        return {"model": route.name, "state": "serving"}

    def target_model(self, model: str, header_target: str | None) -> str:
        return header_target or model

    def priority(self, objective: str | None) -> int:
        return 7 if objective == "critical" else 0

    async def route(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision:
        self.calls.append(("route", request, subset))
        if self.refuse is not None:
            raise self.refuse
        result = SchedulingResult({"default": ProfileResult([self.endpoint])}, "default")
        return Decision([self.endpoint], result, 42)

    def rejected(self, request: InferenceRequest | None, err: EppError) -> None:
        self.calls.append(("rejected", request, err))

    def response_headers(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        self.calls.append(("response_headers", request, decision, response.status))

    def response_body(self, request: InferenceRequest, decision: Decision, chunk: bytes, eos: bool) -> None:
        self.calls.append(("response_body", chunk, eos))

    def complete(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None:
        self.calls.append(("complete", request, decision, response))


class FakeTime:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_stream(director: FakeDirector, now: FakeTime, **options: Any) -> ExtProcStream:
    ids = iter(f"req-{i}" for i in range(1, 100))
    return ExtProcStream(director, StreamOptions(**options), clock=now, request_ids=lambda: next(ids))


async def test_stream_reports_to_its_director_on_its_clock_with_its_ids():
    director, now = FakeDirector(), FakeTime(100.0)
    stream = fake_stream(director, now, trust_objective_header=True)
    now.now = 100.5  # the request's arrival is the stream's start, not when its body is complete
    out = await drive(stream, [headers_msg(headers={"x-gateway-inference-objective": "critical"}, metadata={
        SUBSET: {SUBSET_KEY: "10.0.0.9:8000"}}), body_msg(json.dumps(REQ).encode())])
    request = stream.request
    assert pick_of(out) == "10.0.0.9:8000"
    assert set_headers(out[0])["x-request-id"] == request.request_id == "req-1"  # generated: sent upstream
    assert request.received_at == 100.0 and request.priority == 7 and request.target_model == "my-model"
    assert director.calls == [("body_mode", True), ("route", request, ["10.0.0.9:8000"])]
    decision = stream.decision
    director.calls.clear()
    now.now = 101.0
    await drive(stream, [response_headers_msg()])
    now.now = 102.5
    await drive(stream, [response_body_msg(b'{"id":')])
    now.now = 103.0
    await drive(stream, [response_body_msg(b'"1"}', eos=True)])
    response = stream.response
    assert response.first_byte_at == 102.5 and response.bytes == 10 and response.completed
    assert director.calls == [("response_headers", request, decision, 200), ("response_body", b'{"id":', False),
                              ("response_body", b'"1"}', True), ("complete", request, decision, response)]
    stream.close()
    assert len(director.calls) == 4 and stream.phase is Phase.DONE  # completed once


async def test_the_last_chunk_is_answered_before_the_completion_bookkeeping_runs():
    """The servicer passes the loop's call_soon as ``after_answer``: the answer to the response's end goes out
    with its read, and the plugins, metrics and hooks run after it."""
    director, later = FakeDirector(), []
    stream = ExtProcStream(director, StreamOptions(), clock=FakeTime(1.0), after_answer=later.append)
    await drive(stream, [headers_msg(), body_msg(json.dumps(REQ).encode()), response_headers_msg()])
    out = await drive(stream, [response_body_msg(b'{"id":"1"}', eos=True)])
    assert out[0].response_body.response.body_mutation.streamed_response.end_of_stream
    assert stream.phase is Phase.DONE and [c[0] for c in director.calls][-1] == "response_body"
    assert len(later) == 1
    later[0]()
    assert director.calls[-1] == ("complete", stream.request, stream.decision, stream.response)
    stream.close()
    assert len(later) == 1  # completed once


async def test_stream_refused_by_its_director_answers_with_its_id():
    err = EppError(503, "rejected-no-endpoints", "no endpoint")
    director = FakeDirector(refuse=err)
    stream = fake_stream(director, FakeTime(5.0))
    out = await drive(stream, [headers_msg(), body_msg(json.dumps(REQ).encode())])
    status, headers, doc = immediate(out[0])
    assert status == 503 and headers["x-request-id"] == "req-1" and doc["error"]["message"] == "no endpoint"
    assert [c[0] for c in director.calls] == ["body_mode", "route", "rejected"]
    assert director.calls[-1] == ("rejected", stream.request, err) and stream.phase is Phase.DONE
    stream.close()
    assert director.calls[-1][0] == "rejected"  # nothing routed: nothing to complete
    # Refused before a request exists (bad JSON): the director hears of it without one.
    bad = FakeDirector()
    out = await drive(fake_stream(bad, FakeTime(5.0)), [headers_msg(), body_msg(b"{no json")])
    assert immediate(out[0])[1]["x-request-id"] == "req-1"
    assert bad.calls[-1][:2] == ("rejected", None) and bad.calls[-1][2].reason == "invalid-json"


async def test_model_status_comes_from_the_director():
    director = FakeDirector()
    out = await drive(fake_stream(director, FakeTime(0.0)), [headers_msg("/m/status", method="GET", eos=True)])
    ir = out[0].immediate_response
    assert ir.status.code == 200 and json.loads(ir.body) == {"model": "m", "state": "serving"}
    assert director.calls[-1] == ("status", ModelPath("m", "served-m", "/status"))


def test_plugins_that_use_bodies_get_them_and_only_those_that_need_them_warn(caplog):
    """GIE's default configuration's prefix-cache-scorer reads a conversation's answer when Envoy sends bodies
    (``uses_response_body``) and does without: Envoy sending none is no warning; EPP's default, whose
    predicted-latency-scorer needs them, warns."""
    import logging

    from epp.scheduling.config import EPP_DEFAULT_CONFIG
    gie, epp_default = make_director(), make_director(config=EPP_DEFAULT_CONFIG)
    assert [o.name for o in gie.body_observers] == ["prefix-cache-scorer"]
    with caplog.at_level(logging.WARNING, logger="epp.director"):
        gie.note_response_body_mode(False)
        assert not caplog.records
        epp_default.note_response_body_mode(False)
        assert ["predicted-latency-scorer" in r.getMessage() for r in caplog.records] == [True]
