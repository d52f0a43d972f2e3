"""Request parsing: path dispatch, JSON guards, per-API validation and prefix-matching input."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epp.api.errors import EppError
from epp.api.parsing import api_for_path, decode_json_object, nesting_exceeds, parse_request
from epp.api.types import ApiKind, ErrorStyle, ParsedBody

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
GENERATE = "/inference/v1/generate"


def parse(path: str, body: Any, content_type: str | None = "application/json", **kwargs: Any) -> ParsedBody:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(path, raw, content_type, **kwargs)


def refused(path: str, body: Any, **kwargs: Any) -> EppError:
    with pytest.raises(EppError) as info:
        parse(path, body, **kwargs)
    assert info.value.status == 400
    return info.value


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


# ------------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(("path", "api"), [
    ("/v1/completions", ApiKind.COMPLETIONS),
    ("/v1/chat/completions", ApiKind.CHAT_COMPLETIONS),
    ("/v1/responses", ApiKind.RESPONSES),
    ("/v1/embeddings", ApiKind.EMBEDDINGS),
    ("/v1/messages", ApiKind.MESSAGES),
    ("/v1/messages/count_tokens", ApiKind.COUNT_TOKENS),
    ("/inference/v1/generate", ApiKind.GENERATE),
    # gateway prefixes, query strings, trailing and doubled slashes
    ("/llama-3/v1/chat/completions", ApiKind.CHAT_COMPLETIONS),
    ("/team/a/v1/completions?api-version=2", ApiKind.COMPLETIONS),
    ("/v1/chat/completions/", ApiKind.CHAT_COMPLETIONS),
    ("/v1/chat/completions?x=/v1/embeddings", ApiKind.CHAT_COMPLETIONS),
    ("//v1//messages//count_tokens/", ApiKind.COUNT_TOKENS),
    ("/v1/messages?beta=true", ApiKind.MESSAGES),
    ("/prefix/inference/v1/generate", ApiKind.GENERATE),
    ("/completions", ApiKind.COMPLETIONS),  # llm-d-router claims the bare suffix too
    ("/chat/completions", ApiKind.CHAT_COMPLETIONS),
    # everything else: routed by load, never refused for its path
    ("/tokenize", ApiKind.OTHER),
    ("/detokenize", ApiKind.OTHER),
    ("/v1/score", ApiKind.OTHER),
    ("/v1/rerank", ApiKind.OTHER),
    ("/classify", ApiKind.OTHER),
    ("/invocations", ApiKind.OTHER),
    ("/v1/audio/transcriptions", ApiKind.OTHER),
    ("/v1/models", ApiKind.OTHER),
    ("/v1/chat/completions/render", ApiKind.OTHER),
    ("/v1/responses/resp_123", ApiKind.OTHER),
    ("/v1/xcompletions", ApiKind.OTHER),
    ("/generate", ApiKind.OTHER),
    ("/", ApiKind.OTHER),
    ("", ApiKind.OTHER),
])
def test_api_for_path(path: str, api: ApiKind) -> None:
    assert api_for_path(path) is api


def test_gateway_prefix_path_parses_the_api() -> None:
    parsed = parse("/my-model/v1/chat/completions?trace=1", chat(user("hi")))
    assert parsed.api is ApiKind.CHAT_COMPLETIONS
    assert parsed.model == "m"


# ----------------------------------------------------------------------------------------- body guards


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, RESPONSES, EMBEDDINGS, MESSAGES, COUNT_TOKENS, GENERATE])
@pytest.mark.parametrize(("body", "reason"), [
    (b"", "empty-body"),
    (b"  \r\n", "empty-body"),
    (b'{"model": "m\xff"}', "invalid-utf8"),
    (b"\xef\xbb\xbf{}", "invalid-json"),  # a BOM is not JSON
    (b'{"model": "m",}', "invalid-json"),
    (b'{"model": "m"', "invalid-json"),
    (b'{"model": "m", "x": NaN}', "invalid-json"),
    (b'{"model": "m", "x": Infinity}', "invalid-json"),
    (b'{"model": "m", "x": ' + b"9" * 5000 + b"}", "invalid-json"),
    (b"[]", "not-an-object"),
    (b'"hello"', "not-an-object"),
    (b"null", "not-an-object"),
    (b"42", "not-an-object"),
    (b"true", "not-an-object"),
    (b"{}", "missing-model"),
    (b'{"model": null}', "missing-model"),
    (b'{"model": ""}', "missing-model"),
    (b'{"model": "   "}', "missing-model"),
    (b'{"model": 7}', "missing-model"),
    (b'{"model": ["m"]}', "missing-model"),
])
def test_body_guards(path: str, body: bytes, reason: str) -> None:
    err = refused(path, body)
    assert err.reason == reason
    if reason == "missing-model":
        assert err.param == "model"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, GENERATE, "/v1/score"])
def test_deep_nesting_is_refused_not_a_crash(path: str) -> None:
    deep = b'{"model":"m","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if path == "/v1/score":
        assert parse(path, deep).payload is None  # OTHER: forwarded untouched, never refused
        return
    assert refused(path, deep).reason == "json-too-deep"


def test_deep_nesting_of_objects_and_unterminated_attack() -> None:
    body = b'{"model":"m","x":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}"
    assert refused(CHAT, body).reason == "json-too-deep"
    assert refused(CHAT, b"[" * 1_000_000).reason == "json-too-deep"


def _nested(levels: int) -> bytes:
    # levels counts the top-level object: {"model":"m","x":[[...]]}
    inner = levels - 1
    return b'{"model":"m","prompt":"p","x":' + b"[" * inner + b"]" * inner + b"}"


def test_depth_limit_is_exact() -> None:
    assert parse(COMPLETIONS, _nested(64)).prompt_text == "p"
    assert refused(COMPLETIONS, _nested(65)).reason == "json-too-deep"
    assert parse(COMPLETIONS, _nested(10), max_json_depth=10).prompt_text == "p"
    assert refused(COMPLETIONS, _nested(11), max_json_depth=10).reason == "json-too-deep"


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    text = "[" * 10_000 + '\\"{' * 100 + "\\\\" + "{" * 100
    parsed = parse(COMPLETIONS, {"model": "m", "prompt": text})
    assert parsed.prompt_text == text


def test_nesting_exceeds() -> None:
    assert not nesting_exceeds({"a": [1, {"b": []}]}, 4)
    assert nesting_exceeds({"a": [1, {"b": []}]}, 3)
    assert not nesting_exceeds({}, 1)
    assert nesting_exceeds({"a": list(range(10)), "b": []}, 4, budget=5) is None  # undecided within the budget
    assert nesting_exceeds({"a": [[[]]]}, 2, budget=5) is True


def test_depth_limit_is_exact_behind_many_elements() -> None:
    # More elements than the walk's first budget: the openers are counted first, the answer is the same.
    ids = ",".join(["1"] * 1000).encode()
    body = b'{"model":"m","prompt":[' + ids + b'],"x":%s%s}'
    assert refused(COMPLETIONS, body % (b"[" * 64, b"]" * 64)).reason == "json-too-deep"  # 65 levels
    assert parse(COMPLETIONS, body % (b"[" * 63, b"]" * 63)).payload is not None


def test_decode_json_object_returns_the_dict() -> None:
    assert decode_json_object(b' {"a": [1, 2]} ') == {"a": [1, 2]}


# -------------------------------------------------------------------------------------- common fields


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"),
    ("stream", 1),
    ("cache_salt", 5),
    ("max_tokens", "ten"),
    ("max_tokens", -1),
    ("max_tokens", True),
    ("max_tokens", 1.5),
    ("max_tokens", 10.0),
    ("max_completion_tokens", "x"),
    ("tools", {"type": "function"}),
])
def test_chat_wrong_types_are_invalid_fields(field: str, value: Any) -> None:
    err = refused(CHAT, chat(user("hi"), **{field: value}))
    assert (err.reason, err.param) == ("invalid-field", field)


def test_nulls_count_as_absent() -> None:
    parsed = parse(CHAT, chat(user("hi"), stream=None, max_tokens=None, cache_salt=None, tools=None))
    assert (parsed.stream, parsed.max_output_tokens, parsed.cache_salt) == (False, None, None)


def test_common_fields() -> None:
    body = chat(user("hi"), stream=True, cache_salt="salt", max_tokens=0)
    parsed = parse(CHAT, body)
    assert parsed.stream is True
    assert parsed.cache_salt == "salt"
    assert parsed.max_output_tokens == 0
    assert parsed.payload == body
    assert parsed.error_style is ErrorStyle.OPENAI
    assert not parsed.skip_response


# ------------------------------------------------------------------------------------------ completions


@pytest.mark.parametrize(("prompt", "text", "ids"), [
    ("Once upon a time", "Once upon a time", None),
    ("", "", None),
    (["a", "b"], "a\nb", None),
    ([1, 2, 3], None, [1, 2, 3]),
    ([0, 2**32 - 1], None, [0, 2**32 - 1]),
    ([[1, 2], [3]], None, [1, 2, 3]),
])
def test_completions_prompts(prompt: Any, text: str | None, ids: list[int] | None) -> None:
    parsed = parse(COMPLETIONS, {"model": "m", "prompt": prompt, "max_tokens": 7})
    assert parsed.api is ApiKind.COMPLETIONS
    assert (parsed.prompt_text, parsed.prompt_token_ids) == (text, ids)
    assert parsed.max_output_tokens == 7


def test_completions_with_prompt_embeds_needs_no_prompt() -> None:
    parsed = parse(COMPLETIONS, {"model": "m", "prompt_embeds": "AAAA"})
    assert parsed.prompt_text is None and parsed.prompt_token_ids is None


@pytest.mark.parametrize(("prompt", "param"), [
    (None, "prompt"),
    (5, "prompt"),
    ({"text": "x"}, "prompt"),
    ([], "prompt"),
    (["a", 1], "prompt[1]"),
    ([1, "a"], "prompt"),
    ([1, -1], "prompt"),
    ([1, 2**32], "prompt"),
    ([1, 2.0], "prompt"),
    ([True, False], "prompt"),
    ([[1], []], "prompt[1]"),
    ([[1], [True]], "prompt[1]"),
    ([[1], 2], "prompt[1]"),
    ([None], "prompt"),
])
def test_completions_bad_prompts(prompt: Any, param: str) -> None:
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    err = refused(COMPLETIONS, body)
    assert (err.reason, err.param) == ("invalid-field", param)


# ----------------------------------------------------------------------------------------------- chat


def test_chat_text_and_tools_render_tools_first() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    parsed = parse(CHAT, chat({"role": "system", "content": "Be brief."}, user("Hello"), tools=tools))
    assert parsed.api is ApiKind.CHAT_COMPLETIONS
    assert parsed.prompt_text is not None
    assert parsed.prompt_text.startswith(json.dumps(tools, separators=(",", ":")))
    assert parsed.prompt_text.index("Be brief.") < parsed.prompt_text.index("Hello")
    assert parsed.prompt_token_ids is None


def test_chat_max_completion_tokens_wins() -> None:
    assert parse(CHAT, chat(user("x"), max_tokens=5, max_completion_tokens=9)).max_output_tokens == 9
    assert parse(CHAT, chat(user("x"), max_tokens=5)).max_output_tokens == 5
    assert parse(CHAT, chat(user("x"))).max_output_tokens is None


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def test_chat_multimodal_blocks() -> None:
    blocks = [
        {"type": "text", "text": "What is in these?"},
        _image("https://example.com/a.png"),
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
        {"type": "file", "file": {"file_data": "JVBERi0=", "filename": "a.pdf"}},
        {"type": "some_future_part", "payload": [1, 2]},
    ]
    text = parse(CHAT, chat(user(blocks))).prompt_text
    assert text is not None
    assert "What is in these?" in text
    for kind in ("image", "audio", "video", "file", "some_future_part"):
        assert f"<|{kind}:" in text


def test_media_placeholders_identify_the_media() -> None:
    def render(url: str, detail: str = "high") -> str:
        block = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        return parse(CHAT, chat(user([block]))).prompt_text or ""

    big = "data:image/png;base64," + "A" * 2_000_000
    assert render("https://x/a.png") == render("https://x/a.png")
    assert render("https://x/a.png") == render("https://x/a.png", detail="low")  # options are not identity
    assert render("https://x/a.png") != render("https://x/b.png")
    assert render(big) != render(big[:-1] + "B")
    assert len(render(big)) < 100  # the data itself stays out of prompt_text


def test_chat_image_url_as_plain_string() -> None:
    text = parse(CHAT, chat(user([{"type": "image_url", "image_url": "https://x/a.png"}]))).prompt_text
    assert text is not None and "<|image:" in text


def test_chat_assistant_tool_calls_and_tool_results() -> None:
    messages = [
        user("weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"c":"Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]
    text = parse(CHAT, chat(*messages)).prompt_text
    assert text is not None
    assert 'get_weather{"c":"Paris"}' in text
    assert text.endswith("<|tool|>18C")


def test_chat_rendering_is_prefix_stable() -> None:
    conversation = [
        {"role": "system", "content": "sys"},
        user([{"type": "text", "text": "look"}, _image("https://x/1.png")]),
        {"role": "assistant", "content": "a cat"},
        user("and now?"),
    ]
    renders = [parse(CHAT, chat(*conversation[:n])).prompt_text or ""
               for n in range(1, len(conversation) + 1)]
    for shorter, longer in itertools.pairwise(renders):
        assert longer.startswith(shorter) and len(longer) > len(shorter)


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "tool"]), st.text(max_size=20)),
                min_size=1, max_size=8))
def test_chat_rendering_is_prefix_stable_property(turns: list[tuple[str, str]]) -> None:
    messages = [{"role": role, "content": content} for role, content in turns]
    full = parse(CHAT, chat(*messages)).prompt_text or ""
    for n in range(1, len(messages)):
        assert full.startswith(parse(CHAT, chat(*messages[:n])).prompt_text or "")


def test_different_roles_render_differently() -> None:
    as_user = parse(CHAT, chat(user("x"))).prompt_text
    assert as_user != parse(CHAT, chat({"role": "system", "content": "x"})).prompt_text


@pytest.mark.parametrize(("messages", "param"), [
    (None, "messages"),
    ([], "messages"),
    ("hello", "messages"),
    ({"role": "user"}, "messages"),
    (["hello"], "messages[0]"),
    ([{"content": "x"}], "messages[0].role"),
    ([{"role": "", "content": "x"}], "messages[0].role"),
    ([{"role": 3, "content": "x"}], "messages[0].role"),
    ([user("ok"), user(42)], "messages[1].content"),
    ([user({"type": "text", "text": "x"})], "messages[0].content"),
    ([user(["x"])], "messages[0].content[0]"),
    ([user([{"text": "x"}])], "messages[0].content[0].type"),
    ([user([{"type": "text"}])], "messages[0].content[0].text"),
    ([user([{"type": "text", "text": 5}])], "messages[0].content[0].text"),
    ([{"role": "assistant", "tool_calls": {"id": 1}}], "messages[0].tool_calls"),
])
def test_chat_bad_messages(messages: Any, param: str) -> None:
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    err = refused(CHAT, body)
    assert (err.reason, err.param) == ("invalid-field", param)
    assert param.split(".")[0].split("[")[0] in err.message


# ------------------------------------------------------------------------------------------ responses


def test_responses_string_input() -> None:
    body = {"model": "m", "input": "Tell me a joke", "max_output_tokens": 50, "stream": True}
    parsed = parse(RESPONSES, body)
    assert parsed.api is ApiKind.RESPONSES
    assert parsed.prompt_text is not None and parsed.prompt_text.endswith("Tell me a joke")
    assert parsed.max_output_tokens == 50
    assert parsed.stream


def test_responses_orders_instructions_tools_input() -> None:
    tools = [{"type": "function", "name": "lookup"}]
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "question"},
                                     {"type": "input_image", "image_url": "https://x/i.png"}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q":1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "result-text"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "answer"}]},
        {"type": "reasoning", "summary": []},
    ]
    body = {"model": "m", "instructions": "be nice", "tools": tools, "input": items}
    text = parse(RESPONSES, body).prompt_text
    assert text is not None
    positions = [text.index(s) for s in ('"lookup"', "be nice", "question", "<|image:", 'lookup{"q":1}',
                                         "result-text", "answer", "<|reasoning|>")]
    assert positions == sorted(positions)


def test_the_same_conversation_keys_the_same_prefix_through_chat_responses_and_messages() -> None:
    system, question = "You are terse. " * 20, "What is the capital of France?"
    chat = parse(CHAT, {"model": "m", "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": question}]}).prompt_text
    responses = parse(RESPONSES, {"model": "m", "instructions": system, "input": question}).prompt_text
    messages = parse(MESSAGES, {"model": "m", "max_tokens": 5, "system": system,
                                "messages": [{"role": "user", "content": question}]}).prompt_text
    assert chat == responses == messages


def test_responses_prefix_stable() -> None:
    items = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    short = parse(RESPONSES, {"model": "m", "instructions": "i", "input": items[:1]}).prompt_text or ""
    long = parse(RESPONSES, {"model": "m", "instructions": "i", "input": items}).prompt_text or ""
    assert long.startswith(short)


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"content": "x"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [7]}]}, "input[0].content[0]"),
    ({"input": "x", "instructions": 5}, "instructions"),
    ({"input": "x", "tools": "t"}, "tools"),
    ({"input": "x", "max_output_tokens": -5}, "max_output_tokens"),
])
def test_responses_errors(body: dict[str, Any], param: str) -> None:
    err = refused(RESPONSES, {"model": "m", **body})
    assert (err.reason, err.param) == ("invalid-field", param)


# ----------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize(("value", "text", "ids"), [
    ("hello", "hello", None),
    (["a", "b"], "a\nb", None),
    ([5, 6], None, [5, 6]),
    ([[5], [6, 7]], None, [5, 6, 7]),
])
def test_embeddings_inputs(value: Any, text: str | None, ids: list[int] | None) -> None:
    parsed = parse(EMBEDDINGS, {"model": "m", "input": value})
    assert parsed.api is ApiKind.EMBEDDINGS
    assert (parsed.prompt_text, parsed.prompt_token_ids) == (text, ids)
    assert parsed.max_output_tokens is None


def test_embeddings_chat_style_messages() -> None:
    parsed = parse(EMBEDDINGS, {"model": "m", "messages": [user([_image("https://x/a.png")])]})
    assert parsed.prompt_text is not None and "<|image:" in parsed.prompt_text


@pytest.mark.parametrize("value", [None, "", [], 3, [1.5], [[]], ["a", ["b"]]])
def test_embeddings_bad_input(value: Any) -> None:
    body = {"model": "m"} if value is None else {"model": "m", "input": value}
    err = refused(EMBEDDINGS, body)
    assert err.reason == "invalid-field" and err.param is not None and err.param.startswith("input")


# ----------------------------------------------------------------------------------------- anthropic


def test_anthropic_messages() -> None:
    tools = [{"name": "calc", "description": "math", "input_schema": {"type": "object"}}]
    body = {
        "model": "claude", "max_tokens": 1024, "stream": True, "tools": tools,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            user([{"type": "text", "text": "2+2?"},
                  {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                  {"type": "document", "source": {"type": "url", "url": "https://x/d.pdf"}}]),
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "easy", "signature": "sig"},
                {"type": "tool_use", "id": "t1", "name": "calc", "input": {"expr": "2+2"}},
            ]},
            user([{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "4"}]}]),
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xyz"},
                                              {"type": "server_tool_use", "id": "s", "name": "web"}]},
        ],
    }
    parsed = parse(MESSAGES, body)
    assert parsed.api is ApiKind.MESSAGES
    assert parsed.error_style is ErrorStyle.ANTHROPIC
    assert (parsed.model, parsed.stream, parsed.max_output_tokens) == ("claude", True, 1024)
    assert not parsed.skip_response
    text = parsed.prompt_text or ""
    order = ['"calc"', "You are terse.", "2+2?", "<|image:", "<|document:", "easy", 'calc{"expr":"2+2"}',
             "<|tool_result|>4", "<|redacted_thinking:", "<|server_tool_use:"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert "sig" not in text


def test_anthropic_string_system_and_content_prefix_stable() -> None:
    messages = [user("one"), {"role": "assistant", "content": "two"}, user("three")]
    renders = [parse(MESSAGES, {"model": "c", "system": "S", "messages": messages[:n]}).prompt_text or ""
               for n in (1, 2, 3)]
    assert renders[0].startswith("<|system|>S")
    assert renders[2].startswith(renders[1]) and renders[1].startswith(renders[0])


def test_anthropic_max_tokens_is_not_required() -> None:
    assert parse(MESSAGES, {"model": "c", "messages": [user("x")]}).max_output_tokens is None


def test_count_tokens_skips_the_response() -> None:
    parsed = parse(COUNT_TOKENS, {"model": "c", "messages": [user("count me")]})
    assert parsed.api is ApiKind.COUNT_TOKENS
    assert parsed.skip_response
    assert parsed.error_style is ErrorStyle.ANTHROPIC
    assert parsed.prompt_text is not None and "count me" in parsed.prompt_text


@pytest.mark.parametrize(("body", "param"), [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [5]}, "messages[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [user(5)]}, "messages[0].content"),
    ({"messages": [user([{"text": "x"}])]}, "messages[0].content[0].type"),
    ({"messages": [user([{"type": "text"}])]}, "messages[0].content[0].text"),
    ({"messages": [user([{"type": "thinking", "thinking": 1}])]}, "messages[0].content[0].thinking"),
    ({"messages": [user([{"type": "tool_result", "content": 5}])]}, "messages[0].content[0].content"),
    ({"messages": [user("x")], "system": 5}, "system"),
    ({"messages": [user("x")], "system": [{"type": "text"}]}, "system[0].text"),
    ({"messages": [user("x")], "max_tokens": -1}, "max_tokens"),
    ({"messages": [user("x")], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [user("x")], "tools": {}}, "tools"),
    ({"messages": [user("x")], "stream": "true"}, "stream"),
])
@pytest.mark.parametrize("path", [MESSAGES, COUNT_TOKENS])
def test_anthropic_errors(path: str, body: dict[str, Any], param: str) -> None:
    if path == COUNT_TOKENS and param == "max_tokens":
        return  # count_tokens does not read max_tokens
    err = refused(path, {"model": "c", **body})
    assert (err.reason, err.param) == ("invalid-field", param)


# ----------------------------------------------------------------------------------------- generate


def test_generate() -> None:
    body = {"model": "m", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 16}, "stream": True,
            "cache_salt": "s", "features": {"mm_hashes": {}}}
    parsed = parse(GENERATE, body)
    assert parsed.api is ApiKind.GENERATE
    assert parsed.prompt_token_ids == [1, 2, 3]
    assert parsed.prompt_text is None
    assert (parsed.max_output_tokens, parsed.stream, parsed.cache_salt) == (16, True, "s")


def test_generate_without_sampling_params() -> None:
    assert parse(GENERATE, {"model": "m", "token_ids": [0]}).max_output_tokens is None
    body = {"model": "m", "token_ids": [0], "sampling_params": None}
    assert parse(GENERATE, body).max_output_tokens is None


@pytest.mark.parametrize(("body", "param"), [
    ({}, "token_ids"),
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": "1 2 3"}, "token_ids"),
    ({"token_ids": [True]}, "token_ids"),
    ({"token_ids": [1, False]}, "token_ids"),
    ({"token_ids": [-1]}, "token_ids"),
    ({"token_ids": [2**32]}, "token_ids"),
    ({"token_ids": [1.0]}, "token_ids"),
    ({"token_ids": [[1]]}, "token_ids"),
    ({"token_ids": [1], "sampling_params": []}, "sampling_params"),
    ({"token_ids": [1], "sampling_params": {"max_tokens": -2}}, "sampling_params.max_tokens"),
    ({"token_ids": [1], "sampling_params": {"max_tokens": "8"}}, "sampling_params.max_tokens"),
])
def test_generate_errors(body: dict[str, Any], param: str) -> None:
    err = refused(GENERATE, {"model": "m", **body})
    assert (err.reason, err.param) == ("invalid-field", param)


def test_large_token_id_prompt() -> None:
    ids = list(range(200_000))
    assert parse(GENERATE, {"model": "m", "token_ids": ids}).prompt_token_ids == ids


# ---------------------------------------------------------------------------------------- other paths


def test_other_json_picks_model_and_stream_without_validation() -> None:
    parsed = parse("/v1/score", {"model": "rerank", "stream": True, "text_1": "a"})
    assert parsed.api is ApiKind.OTHER
    assert (parsed.model, parsed.stream) == ("rerank", True)
    assert parsed.payload == {"model": "rerank", "stream": True, "text_1": "a"}


@pytest.mark.parametrize("body", [b"", b"{}", b'{"stream": "yes", "model": 5}', b"not json", b"{broken",
                                  b"[1, 2]", b"\xff\xfe", b'{"model": NaN}'])
def test_other_never_refuses(body: bytes) -> None:
    parsed = parse_request("/tokenize", body, "application/json")
    assert parsed.api is ApiKind.OTHER
    assert (parsed.model, parsed.stream) == ("", False)


def test_other_without_content_type_still_reads_json() -> None:
    assert parse_request("/classify", b'  {"model": "c"}', None).model == "c"


def _multipart(boundary: str, fields: list[tuple[str, bytes, str | None]]) -> bytes:
    out = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        if filename:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + value + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def test_multipart_model_field() -> None:
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    audio = b'RIFF\x00\xff\r\nContent-Disposition: form-data; name="model"\r\n\r\nfake\r\n' * 100
    body = _multipart(boundary, [("file", audio, "model"), ("model", b"whisper-large", None),
                                 ("stream", b"true", None)])
    parsed = parse_request("/v1/audio/transcriptions", body, f'multipart/form-data; boundary="{boundary}"')
    assert parsed.api is ApiKind.OTHER
    assert (parsed.model, parsed.stream) == ("whisper-large", True)
    assert parsed.payload is None


def test_multipart_without_model_or_boundary() -> None:
    body = _multipart("b", [("file", b"data", "a.wav")])
    assert parse_request("/v1/audio/transcriptions", body, "multipart/form-data; boundary=b").model == ""
    assert parse_request("/v1/audio/transcriptions", body, "multipart/form-data").model == ""
    truncated = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper'
    assert parse_request("/v1/audio/transcriptions", truncated, "multipart/form-data; boundary=b").model == ""


def test_known_api_with_multipart_body_is_unsupported_media_type() -> None:
    body = _multipart("b", [("model", b"m", None)])
    with pytest.raises(EppError) as info:
        parse_request(CHAT, body, "multipart/form-data; boundary=b")
    assert (info.value.status, info.value.reason) == (415, "unsupported-media-type")


# --------------------------------------------------------------------------------------------- fuzzing

_PATHS = [COMPLETIONS, CHAT, RESPONSES, EMBEDDINGS, MESSAGES, COUNT_TOKENS, GENERATE, "/v1/other"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["model", "messages", "prompt", "input", "role", "content", "type", "text",
                         "token_ids", "system", "tools", "stream", "max_tokens", "image_url", "url",
                         "sampling_params"]),
        children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400)
@given(path=st.sampled_from(_PATHS), value=_json_values)
def test_fuzz_structured_bodies_only_raise_epp_errors(path: str, value: Any) -> None:
    body = value if isinstance(value, dict) else {"model": "m", "messages": value, "prompt": value,
                                                  "input": value, "token_ids": value}
    try:
        parsed = parse(path, body)
    except EppError as err:
        assert err.status == 400 and err.reason
    else:
        assert parsed.prompt_text is None or isinstance(parsed.prompt_text, str)


@settings(max_examples=300)
@given(path=st.sampled_from(_PATHS), body=st.binary(max_size=200))
def test_fuzz_raw_bytes_only_raise_epp_errors(path: str, body: bytes) -> None:
    try:
        parse_request(path, body, None)
    except EppError as err:
        assert err.status == 400
