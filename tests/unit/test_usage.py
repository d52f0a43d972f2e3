"""Usage extraction from JSON and SSE response bodies, whatever the chunking."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.api.types import ApiKind, Usage
from epp.api.usage import UsageExtractor, usage_from_object

SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


def extract(chunks: list[bytes], content_type: str | None, api: ApiKind = ApiKind.CHAT_COMPLETIONS,
            **kwargs: Any) -> Usage | None:
    extractor = UsageExtractor(api, **kwargs)
    for chunk in chunks:
        extractor.feed(chunk, content_type)
    return extractor.finish()


def splits(data: bytes) -> list[list[bytes]]:
    """The body cut in two at every byte boundary (and whole)."""
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def sse(*events: Any, event_names: bool = False, space: bool = True, newline: str = "\n") -> bytes:
    lines = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        if event_names and isinstance(event, dict):
            lines.append(f"event: {event.get('type')}")
        lines.append(("data: " if space else "data:") + data)
        lines.append("")
    return (newline.join(lines) + newline).encode()


# ----------------------------------------------------------------------------------------------- JSON

OPENAI_JSON = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "the usage is fine"}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
              "prompt_tokens_details": {"cached_tokens": 64}},
}).encode()


def test_openai_json_usage_at_every_split() -> None:
    for chunks in splits(OPENAI_JSON):
        assert extract(chunks, JSON) == Usage(100, 20, 64)


def test_responses_json_usage() -> None:
    body = {"id": "resp_1", "object": "response", "output": [],
            "usage": {"input_tokens": 30, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 16}}}
    assert extract([json.dumps(body).encode()], JSON, ApiKind.RESPONSES) == Usage(30, 5, 16)


def test_anthropic_json_usage_counts_cache_reads_in_the_prompt() -> None:
    body = {"type": "message", "content": [], "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 90, "cache_creation_input_tokens": 5,
        "output_tokens": 7}}
    assert extract([json.dumps(body).encode()], JSON, ApiKind.MESSAGES) == Usage(105, 7, 90)


def test_vllm_anthropic_json_usage_without_cache_fields() -> None:
    body = {"type": "message", "usage": {"input_tokens": 12, "output_tokens": 3}}
    assert extract([json.dumps(body).encode()], JSON, ApiKind.MESSAGES) == Usage(12, 3, None)


def test_embeddings_usage_has_no_completion() -> None:
    body = {"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    assert extract([json.dumps(body).encode()], JSON, ApiKind.EMBEDDINGS) == Usage(8, None, None)


@pytest.mark.parametrize("body", [
    b"", b"{}", b'{"usage": null}', b'{"usage": {}}', b'{"usage": {"prompt_tokens": "5"}}',
    b'{"usage": {"prompt_tokens": -1}}', b'{"usage": {"prompt_tokens": true}}', b"[1, 2]", b"not json",
    b'{"usage": {"prompt_tokens": 5', b"\xff\xfe\x00", b"[" * 100_000,
])
def test_json_without_usable_usage_is_none(body: bytes) -> None:
    assert extract([body], JSON) is None


def test_json_over_the_cap_gives_up() -> None:
    assert extract([OPENAI_JSON], JSON, max_buffer=len(OPENAI_JSON) - 1) is None
    assert extract([OPENAI_JSON], JSON, max_buffer=len(OPENAI_JSON)) == Usage(100, 20, 64)
    half = len(OPENAI_JSON) // 2
    assert extract([OPENAI_JSON[:half], OPENAI_JSON[half:]], JSON, max_buffer=half + 1) is None


def test_large_json_body_finds_usage_without_decoding_everything() -> None:
    vectors = [{"object": "embedding", "index": i, "embedding": [0.125] * 256} for i in range(300)]
    body = json.dumps({"object": "list", "data": vectors, "model": "e",
                       "usage": {"prompt_tokens": 999, "total_tokens": 999}}).encode()
    assert len(body) > 256 << 10
    cut = len(body) // 3
    assert extract([body[:cut], body[cut:]], JSON, ApiKind.EMBEDDINGS) == Usage(999, None, None)


def test_large_json_body_with_nested_usage_like_keys() -> None:
    filler = "x" * (300 << 10)
    body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "text": filler,
                       "meta": {"usage": "not an object"}}).encode()
    assert extract([body], JSON) == Usage(1, 2, None)


def test_content_type_none_sniffs_the_framing() -> None:
    assert extract([b"  \n", OPENAI_JSON], None) == Usage(100, 20, 64)
    stream = sse({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}, "[DONE]")
    assert extract([stream], None) == Usage(1, 2, None)


def test_first_content_type_decides() -> None:
    extractor = UsageExtractor(ApiKind.CHAT_COMPLETIONS)
    extractor.feed(OPENAI_JSON[:10], JSON)
    extractor.feed(OPENAI_JSON[10:], SSE)
    assert extractor.finish() == Usage(100, 20, 64)


def test_finish_is_idempotent_and_late_feeds_are_ignored() -> None:
    extractor = UsageExtractor(ApiKind.CHAT_COMPLETIONS)
    extractor.feed(OPENAI_JSON, JSON)
    assert extractor.finish() == Usage(100, 20, 64)
    extractor.feed(b"garbage", JSON)
    assert extractor.finish() == Usage(100, 20, 64)


# ------------------------------------------------------------------------------------------------ SSE


def _chat_chunk(text: str, usage: Any = "absent") -> dict[str, Any]:
    chunk: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "m",
                             "choices": [{"index": 0, "delta": {"content": text}}]}
    if usage != "absent":
        chunk["usage"] = usage
    return chunk


OPENAI_STREAM = sse(
    _chat_chunk("Hel", usage=None),
    _chat_chunk("lo", usage=None),
    {"id": "c", "object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13,
               "prompt_tokens_details": {"cached_tokens": 8}}},
    "[DONE]",
)


def test_openai_include_usage_stream_at_every_split() -> None:
    for chunks in splits(OPENAI_STREAM):
        assert extract(chunks, SSE) == Usage(11, 2, 8)


def test_openai_stream_byte_by_byte() -> None:
    assert extract([bytes([b]) for b in OPENAI_STREAM], SSE) == Usage(11, 2, 8)


def test_stream_without_usage_is_none() -> None:
    assert extract([sse(_chat_chunk("a"), _chat_chunk("b", usage=None), "[DONE]")], SSE) is None


def test_data_without_space_and_crlf_lines() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1}}
    for body in (sse(usage, space=False), sse(usage, newline="\r\n"), sse(usage, newline="\r")):
        for chunks in splits(body):
            assert extract(chunks, SSE) == Usage(4, 1, None)


def test_last_line_without_newline_is_read_at_finish() -> None:
    body = b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    for chunks in splits(body):
        assert extract(chunks, SSE) == Usage(3, 4, None)


def test_continuous_usage_stats_last_report_wins() -> None:
    events = [_chat_chunk(str(i), usage={"prompt_tokens": 5, "completion_tokens": i}) for i in range(1, 6)]
    assert extract([sse(*events, "[DONE]")], SSE) == Usage(5, 5, None)


RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {"id": "r", "status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "delta": "usage"},
    {"type": "response.output_text.delta", "delta": "Hi"},
    {"type": "response.completed", "response": {"id": "r", "status": "completed", "usage": {
        "input_tokens": 50, "output_tokens": 9, "total_tokens": 59,
        "input_tokens_details": {"cached_tokens": 32},
        "output_tokens_details": {"reasoning_tokens": 0}}}},
    event_names=True,
)


def test_responses_stream_at_every_split() -> None:
    for chunks in splits(RESPONSES_STREAM):
        assert extract(chunks, SSE, ApiKind.RESPONSES) == Usage(50, 9, 32)


ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": {"id": "msg", "type": "message", "role": "assistant", "content": [],
                                          "model": "claude", "usage": {"input_tokens": 25,
                                                                       "cache_read_input_tokens": 100,
                                                                       "output_tokens": 1}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
    {"type": "message_stop"},
    event_names=True,
)


def test_anthropic_stream_merges_start_and_delta_at_every_split() -> None:
    for chunks in splits(ANTHROPIC_STREAM):
        assert extract(chunks, SSE, ApiKind.MESSAGES) == Usage(125, 15, 100)


def test_vllm_anthropic_stream() -> None:
    body = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 0}}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"input_tokens": 7, "output_tokens": 3}},
        {"type": "message_stop"},
    )
    assert extract([body], SSE, ApiKind.MESSAGES) == Usage(7, 3, None)


def test_sse_line_over_the_cap_is_skipped_and_later_usage_still_found() -> None:
    huge = b'data: {"usage": {"prompt_tokens": 1}, "pad": "' + b"x" * 5000 + b'"}\n\n'
    tail = sse({"usage": {"prompt_tokens": 2, "completion_tokens": 3}})
    for step in (1000, 4096, len(huge) + len(tail)):
        body = huge + tail
        chunks = chunked(body, list(range(step, len(body), step)))
        assert extract(chunks, SSE, max_buffer=1024) == Usage(2, 3, None)


@pytest.mark.parametrize("body", [
    b"data: [DONE]\n\n",
    b"data: {\"usage\": {broken\n\n",
    b"data: {\"usage\": [1,2]}\n\n",
    b"event: x\ndata\n:comment\n\n",
    b"data: " + b"[" * 100_000 + b'"usage": {\n',
    b'data: {"usage": {"prompt_tokens": 1e400}}\n',
    b"\xff\xfe\xfd\n\n\r\r",
    b'notdata: {"usage": {"prompt_tokens": 5}}\n',
    b'data:: {"usage": {"prompt_tokens": 5}}\n',
])
def test_sse_garbage_is_none(body: bytes) -> None:
    for chunks in [*splits(body[:200]), [body]]:
        assert extract(chunks, SSE) is None


# ------------------------------------------------------------------------------------- chunking property


@settings(max_examples=300)
@given(data=st.data())
def test_any_chunking_gives_the_same_usage(data: st.DataObject) -> None:
    body, content_type, api, expected = data.draw(st.sampled_from([
        (OPENAI_STREAM, SSE, ApiKind.CHAT_COMPLETIONS, Usage(11, 2, 8)),
        (RESPONSES_STREAM, SSE, ApiKind.RESPONSES, Usage(50, 9, 32)),
        (ANTHROPIC_STREAM, SSE, ApiKind.MESSAGES, Usage(125, 15, 100)),
        (OPENAI_JSON, JSON, ApiKind.CHAT_COMPLETIONS, Usage(100, 20, 64)),
        (OPENAI_STREAM.replace(b"\n", b"\r\n"), None, ApiKind.CHAT_COMPLETIONS, Usage(11, 2, 8)),
    ]))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    assert extract(chunked(body, cuts), content_type, api) == expected


@settings(max_examples=300)
@given(chunks=st.lists(st.binary(max_size=64), max_size=10),
       content_type=st.sampled_from([SSE, JSON, None, "text/plain"]),
       api=st.sampled_from(list(ApiKind)))
def test_garbage_never_raises(chunks: list[bytes], content_type: str | None, api: ApiKind) -> None:
    result = extract(chunks, content_type, api, max_buffer=128)
    assert result is None or isinstance(result, Usage)


@settings(max_examples=200)
@given(prefix=st.lists(st.sampled_from([b"data: ", b"usage", b'"usage"', b":", b"{", b"}", b"\n", b"\r",
                                        b'"prompt_tokens"', b"5", b",", b" ", b"[DONE]", b"null"]),
                       max_size=30))
def test_usage_like_noise_never_raises(prefix: list[bytes]) -> None:
    body = b"".join(prefix)
    for chunks in splits(body):
        extract(chunks, SSE)


def test_usage_from_object_shapes() -> None:
    assert usage_from_object(None) is None
    assert usage_from_object({"total_tokens": 3}) is None
    assert usage_from_object({"prompt_tokens": 2, "input_tokens": 9}) == Usage(2, None, None)
    assert usage_from_object({"completion_tokens": 2, "output_tokens": 9}) == Usage(None, 2, None)
    assert usage_from_object({"prompt_tokens_details": {"cached_tokens": 1}}) == Usage(None, None, 1)
    assert usage_from_object({"prompt_tokens_details": None, "input_tokens_details": {"cached_tokens": 4}}) \
        == Usage(None, None, 4)


# ------------------------------------------------------------------------------ the final event (finished)


def final(chunks: list[bytes], content_type: str | None, api: ApiKind = ApiKind.CHAT_COMPLETIONS,
          finish: bool = True, **kwargs: Any) -> str | None:
    extractor = UsageExtractor(api, **kwargs)
    for chunk in chunks:
        extractor.feed(chunk, content_type)
    if finish:
        extractor.finish()
    assert extractor.finished is (extractor.outcome is not None)
    return extractor.outcome


FINAL_STREAMS = [
    (OPENAI_STREAM, ApiKind.CHAT_COMPLETIONS, "completed"),
    (OPENAI_STREAM.replace(b"\n", b"\r\n"), ApiKind.CHAT_COMPLETIONS, "completed"),
    (RESPONSES_STREAM, ApiKind.RESPONSES, "completed"),
    (RESPONSES_STREAM.replace(b"response.completed", b"response.failed"), ApiKind.RESPONSES, "failed"),
    (RESPONSES_STREAM.replace(b"response.completed", b"response.incomplete"), ApiKind.RESPONSES, "incomplete"),
    (ANTHROPIC_STREAM, ApiKind.MESSAGES, "completed"),
    (sse({"type": "message_start"}, {"type": "message_stop"}), ApiKind.MESSAGES, "completed"),  # no event: lines
    (b"event: message_stop\ndata: {}\n\n", ApiKind.MESSAGES, "completed"),  # the event name alone
    (sse({"request_id": "g", "choices": [{"token_ids": [1]}]}, "[DONE]", space=False), ApiKind.GENERATE, "completed"),
]


@pytest.mark.parametrize(("body", "api", "outcome"), FINAL_STREAMS)
def test_final_event_is_seen_at_every_split(body: bytes, api: ApiKind, outcome: str) -> None:
    for chunks in splits(body):
        assert final(chunks, SSE, api) == outcome
        assert final(chunks, SSE, api, finish=False) == outcome  # known while feeding, before finish()


def test_final_event_byte_by_byte() -> None:
    for body, api, outcome in FINAL_STREAMS:
        assert final([bytes([b]) for b in body], SSE, api) == outcome


def test_responses_final_event_without_usage_is_seen() -> None:
    body = sse({"type": "response.output_text.delta", "delta": "x"},
               {"type": "response.failed", "response": {"id": "r", "status": "failed", "usage": None}},
               event_names=True)
    assert final([body], SSE, ApiKind.RESPONSES) == "failed"


def test_final_event_after_a_long_last_line_is_seen() -> None:
    text = "y" * 20_000
    body = sse(_chat_chunk(text), {"type": "response.completed", "response": {"usage": {"input_tokens": 1},
                                                                         "output": text}}, event_names=True)
    assert final([body], SSE, ApiKind.RESPONSES) == "completed"  # recognised where its usage is decoded
    assert final([sse(_chat_chunk(text), "[DONE]")], SSE) == "completed"


@pytest.mark.parametrize(("body", "api"), [
    (OPENAI_STREAM[:OPENAI_STREAM.rindex(b"data: [DONE]")], ApiKind.CHAT_COMPLETIONS),
    (ANTHROPIC_STREAM[:ANTHROPIC_STREAM.rindex(b"event: message_stop")], ApiKind.MESSAGES),
    (RESPONSES_STREAM[:RESPONSES_STREAM.rindex(b"event: response.completed")], ApiKind.RESPONSES),
    (b"data: [DONE", ApiKind.CHAT_COMPLETIONS),  # the line never ended
    # Tokens that spell final events are not events.
    (sse(_chat_chunk("data: [DONE]"), _chat_chunk("\n\ndata: [DONE]\n\n")), ApiKind.CHAT_COMPLETIONS),
    (sse({"type": "content_block_delta", "delta": {"text": "message_stop"}}), ApiKind.MESSAGES),
    (sse({"type": "response.output_text.delta", "delta": "response.completed"}), ApiKind.RESPONSES),
    (sse({"type": "response.created", "response": {"status": "in_progress"}}), ApiKind.RESPONSES),
    (b"data: [DONE]\n\ndata: {}\n\n", ApiKind.CHAT_COMPLETIONS),  # something after it: not the end after all
    (b"", ApiKind.CHAT_COMPLETIONS),
])
def test_no_final_event_is_not_finished(body: bytes, api: ApiKind) -> None:
    for chunks in [*splits(body[:300]), [body]]:
        assert final(chunks, SSE, api) is None


def test_json_body_is_finished_when_whole_or_at_its_content_length() -> None:
    for chunks in splits(OPENAI_JSON):
        assert final(chunks, JSON) == "completed"
        assert final(chunks, JSON, finish=False, content_length=len(OPENAI_JSON)) == "completed"
    assert final([OPENAI_JSON[:-1]], JSON) is None
    assert final([OPENAI_JSON[:-1]], JSON, content_length=len(OPENAI_JSON)) is None
    assert final([b"[1, 2]"], JSON) == "completed"
    assert final([b"not json"], JSON) is None
    # Too large to decode whole, or over the buffer cap: only the content-length tells.
    assert final([OPENAI_JSON], JSON, max_buffer=10) is None
    assert final([OPENAI_JSON[:20], OPENAI_JSON[20:]], JSON, max_buffer=10, content_length=len(OPENAI_JSON)) \
        == "completed"


def test_responses_json_outcome_is_its_status() -> None:
    for status, outcome in (("completed", "completed"), ("incomplete", "incomplete"), ("failed", "failed"),
                            (None, "completed")):
        body = json.dumps({"id": "r", "object": "response", "status": status, "usage": None}).encode()
        assert final([body], JSON, ApiKind.RESPONSES) == outcome


@settings(max_examples=200)
@given(data=st.data())
def test_any_chunking_gives_the_same_outcome(data: st.DataObject) -> None:
    body, api, outcome = data.draw(st.sampled_from(FINAL_STREAMS))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=40))
    assert final(chunked(body, cuts), SSE, api) == outcome
    assert final(chunked(body[:-len(body) // 3], cuts), SSE, api) is None
