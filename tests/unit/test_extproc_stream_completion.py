"""When does a routed request count as completed? When the response's end-of-stream (or trailers) reached EPP,
or, if the ext_proc stream closed first, when EPP saw the API's final event: a client that stops reading at
``data: [DONE]`` and drops the connection (the OpenAI SDK does) makes Envoy reset the ext_proc stream before
the model server's end-of-stream, which often trails the last event, gets there."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.api.types import Usage
from epp.scheduling.plugins import RequestObserver
from epp.scheduling.registry import register_plugin
from tests.extproc_helpers import body_msg, drive, headers_msg, make_director, new_stream, response_body_msg


@register_plugin("test-completion-recorder")
class CompletionRecorder(RequestObserver):
    """What on_response_complete is told (the prefix scorer learns from cached_tokens only when completed)."""

    def __init__(self) -> None:
        self.completed: list = []

    def on_response_complete(self, request, endpoint, response):
        self.completed.append((response.completed, response.usage, response.outcome))


CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: test-completion-recorder
  name: rec
"""
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


def sse(*events: dict | str, named: bool = False) -> list[bytes]:
    """One chunk per event, as a model server writes them."""
    out = []
    for ev in events:
        data = ev if isinstance(ev, str) else json.dumps(ev, separators=(",", ":"))
        name = f"event: {ev['type']}\n" if named and isinstance(ev, dict) else ""
        out.append(f"{name}data: {data}\n\n".encode())
    return out


def response_headers(content_type: str, content_length: int | None = None) -> pb.ProcessingRequest:
    headers = {":status": "200", "content-type": content_type}
    if content_length is not None:
        headers["content-length"] = str(content_length)
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])))


def _chat(text: str) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


CHAT = sse(_chat("Hel"), _chat("lo"), {"id": "c", "choices": [], "usage": {
    "prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 32}}}, "[DONE]")
ANTHROPIC = sse(
    {"type": "message_start", "message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 30,
                                                    "output_tokens": 1}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}},
    {"type": "message_stop"}, named=True)


def _responses(final: str, status: str) -> list[bytes]:
    return sse({"type": "response.created", "response": {"id": "r", "status": "in_progress", "usage": None}},
               {"type": "response.output_text.delta", "delta": "Hi"},
               {"type": final, "response": {"id": "r", "status": status, "usage": {
                   "input_tokens": 20, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 16}}}},
               named=True)


GENERATE = sse({"request_id": "g", "choices": [{"index": 0, "finish_reason": None, "token_ids": [5]}]},
               {"request_id": "g", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}, "[DONE]")
CHAT_JSON = json.dumps({"id": "c", "object": "chat.completion", "choices": [], "usage": {
    "prompt_tokens": 40, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 32}}}).encode()

REQUESTS = {
    "chat": ("/v1/chat/completions", {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}),
    "messages": ("/v1/messages", {"model": "m", "max_tokens": 5, "stream": True,
                                  "messages": [{"role": "user", "content": "x"}]}),
    "responses": ("/v1/responses", {"model": "m", "stream": True, "input": "x"}),
    "generate": ("/inference/v1/generate", {"model": "m", "token_ids": [1, 2, 3], "stream": True,
                                            "sampling_params": {"max_tokens": 1}}),
}

# (request, response content type, content-length header, body chunks, usage, outcome)
COMPLETE = {
    "chat-sse": ("chat", SSE, None, CHAT, Usage(40, 2, 32), "completed"),
    "anthropic-sse": ("messages", SSE, None, ANTHROPIC, Usage(40, 5, 30), "completed"),
    "responses-completed": ("responses", SSE, None, _responses("response.completed", "completed"),
                            Usage(20, 3, 16), "completed"),
    "responses-failed": ("responses", SSE, None, _responses("response.failed", "failed"), Usage(20, 3, 16), "failed"),
    "responses-incomplete": ("responses", SSE, None, _responses("response.incomplete", "incomplete"),
                             Usage(20, 3, 16), "incomplete"),
    "generate-sse": ("generate", SSE, None, GENERATE, Usage(3, 1, None), "completed"),
    "json-content-length": ("chat", JSON, len(CHAT_JSON), [CHAT_JSON[:30], CHAT_JSON[30:]], Usage(40, 2, 32),
                            "completed"),
    "json-chunked-parsed-whole": ("chat", JSON, None, [CHAT_JSON[:30], CHAT_JSON[30:]], Usage(40, 2, 32),
                                  "completed"),
}


async def _respond(request: str, content_type: str, content_length: int | None, chunks: list[bytes],
                   eos: bool = False):
    director = make_director(config=CONFIG)
    stream = new_stream(director)
    path, body = REQUESTS[request]
    await drive(stream, [headers_msg(path), body_msg(json.dumps(body).encode())])
    assert director.pool.endpoints[0].inflight_requests == 1
    msgs = [response_headers(content_type, content_length)]
    msgs += [response_body_msg(c, eos=eos and i == len(chunks) - 1) for i, c in enumerate(chunks)]
    out = await drive(stream, msgs)
    assert len(out) == 1 + len(chunks)  # every chunk answered, in order
    return director, stream


@pytest.mark.parametrize("case", list(COMPLETE))
async def test_final_event_then_close_is_completed_with_usage(case):
    request, ctype, length, chunks, usage, outcome = COMPLETE[case]
    director, stream = await _respond(request, ctype, length, chunks)
    assert director.config.plugins["rec"].completed == []  # no end-of-stream yet
    stream.close()  # Envoy reset the stream: the client left after the final event
    assert director.config.plugins["rec"].completed == [(True, usage, outcome)]
    assert director.pool.endpoints[0].inflight_requests == 0
    stream.close()
    assert len(director.config.plugins["rec"].completed) == 1  # exactly once


@pytest.mark.parametrize("case", list(COMPLETE))
async def test_end_of_stream_still_completes_and_reports_the_outcome(case):
    request, ctype, length, chunks, usage, outcome = COMPLETE[case]
    director, stream = await _respond(request, ctype, length, chunks, eos=True)
    assert director.config.plugins["rec"].completed == [(True, usage, outcome)]
    stream.close()
    assert len(director.config.plugins["rec"].completed) == 1


@pytest.mark.parametrize("case", [c for c in COMPLETE if "sse" in c or "responses" in c])
async def test_close_without_the_final_event_is_abnormal(case):
    request, ctype, length, chunks, usage, _ = COMPLETE[case]
    director, stream = await _respond(request, ctype, length, chunks[:-1])
    stream.close()
    ((completed, seen_usage, outcome),) = director.config.plugins["rec"].completed
    assert not completed and outcome is None
    if "responses" not in case:  # Responses reports its usage only in the final event
        assert seen_usage == usage  # what was reported is still passed on


@pytest.mark.parametrize("length", [len(CHAT_JSON), None])
async def test_json_body_cut_short_is_abnormal(length):
    director, stream = await _respond("chat", JSON, length, [CHAT_JSON[:-5]])
    stream.close()
    assert director.config.plugins["rec"].completed == [(False, None, None)]


async def test_tokens_that_spell_a_final_event_do_not_end_the_stream():
    chunks = sse(_chat("data: [DONE]"), _chat("\n\ndata: [DONE]\n\n"),
                 {"type": "content_block_delta", "delta": {"text": "message_stop"}}, _chat("event: message_stop"))
    director, stream = await _respond("chat", SSE, None, chunks)
    stream.close()
    assert director.config.plugins["rec"].completed == [(False, None, None)]


async def test_final_event_split_over_many_chunks():
    body = b"".join(CHAT)
    tail = len(CHAT[-1]) + 3
    chunks = [body[:-tail]] + [bytes([b]) for b in body[-tail:]]
    director, stream = await _respond("chat", SSE, None, chunks)
    stream.close()
    assert director.config.plugins["rec"].completed == [(True, Usage(40, 2, 32), "completed")]


async def test_close_before_the_response_headers_is_abnormal():
    director = make_director(config=CONFIG)
    stream = new_stream(director)
    await drive(stream, [headers_msg("/v1/chat/completions"), body_msg(json.dumps(REQUESTS["chat"][1]).encode())])
    stream.close()
    assert director.config.plugins["rec"].completed == [(False, None, None)]
