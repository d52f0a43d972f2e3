"""A conversation's continuation (epp/api/answer.py): the answer read from a response body, as the next turn
resends it."""

from __future__ import annotations

import json

from epp.api.answer import MAX_ANSWER_BODY, AnswerCollector, answer_collector, continuation_text
from epp.api.parsing import parse_request
from epp.api.types import ApiKind, InferenceRequest


def request(path: str, payload: dict) -> InferenceRequest:
    raw = json.dumps(payload).encode()
    body = parse_request(path, raw, "application/json", 64)
    return InferenceRequest("r", path, "POST", {}, body, raw, target_model="m")


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]


def sse(events: list[dict], done: bool = True) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + ([b"data: [DONE]\n\n"] if done else [])


def collect(api: ApiKind, chunks: list[bytes]) -> str | None:
    c = AnswerCollector(api)
    for chunk in chunks:
        c.feed(chunk)
    return c.text()


def test_the_next_turn_begins_with_the_continuation():
    """Chat and Anthropic messages render by appending: the next turn, which resends the answer, starts with
    the prompt, the assistant's marker and the answer, whatever the question after it."""
    for path, extra in (("/v1/chat/completions", {}), ("/v1/messages", {"max_tokens": 5})):
        this = request(path, {"model": "m", "messages": CHAT, **extra})
        nxt = request(path, {"model": "m", "messages": [*CHAT, {"role": "assistant", "content": "Blue."},
                                                         {"role": "user", "content": "Another?"}], **extra})
        text = continuation_text(this, "Blue.")
        assert text is not None and len(text) > len(this.body.prompt_text)
        assert nxt.body.prompt_text.startswith(text)


def test_chat_answers_streamed_and_whole():
    deltas = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "Bl"}}]},
              {"choices": [{"index": 0, "delta": {"content": "ue."}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}]
    body = b"".join(sse(deltas))
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # chunks cut anywhere
    assert collect(ApiKind.CHAT_COMPLETIONS, pieces) == "Blue."
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Blue."}}]}
    assert collect(ApiKind.CHAT_COMPLETIONS, [json.dumps(whole).encode()]) == "Blue."


def test_anthropic_answers_streamed_and_whole():
    events = [{"type": "message_start", "message": {}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Bl"}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ue."}},
              {"type": "content_block_stop", "index": 0}, {"type": "message_stop"}]
    assert collect(ApiKind.MESSAGES, sse(events, done=False)) == "Blue."
    whole = {"content": [{"type": "text", "text": "Blue."}]}
    assert collect(ApiKind.MESSAGES, [json.dumps(whole).encode()]) == "Blue."


def test_answers_that_are_not_plain_text_do_not_continue():
    tool = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]}
    reasoning = {"choices": [{"index": 0, "delta": {"reasoning_content": "First, ..."}}]}
    content = {"choices": [{"index": 0, "delta": {"content": "Blue."}}]}
    assert collect(ApiKind.CHAT_COMPLETIONS, sse([reasoning, content])) is None  # the server cached the reasoning
    whole = {"choices": [{"index": 0, "message": {"content": "Blue.", "reasoning_content": "First, ..."}}]}
    assert collect(ApiKind.CHAT_COMPLETIONS, [json.dumps(whole).encode()]) is None
    two = {"choices": [{"index": 1, "delta": {"content": "x"}}]}
    thinking = {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}
    assert collect(ApiKind.CHAT_COMPLETIONS, sse([tool])) is None
    assert collect(ApiKind.CHAT_COMPLETIONS, sse([two])) is None
    assert collect(ApiKind.MESSAGES, sse([thinking], done=False)) is None
    assert collect(ApiKind.MESSAGES, [json.dumps({"content": [{"type": "tool_use", "name": "f"}]}).encode()]) is None
    assert collect(ApiKind.CHAT_COMPLETIONS, [b"data: {not json\n\n"]) is None
    assert collect(ApiKind.CHAT_COMPLETIONS, []) is None


def test_a_body_over_the_limit_is_given_up():
    delta = {"choices": [{"index": 0, "delta": {"content": "word "}}]}
    chunks = sse([delta] * (MAX_ANSWER_BODY // 40))
    assert sum(map(len, chunks)) > MAX_ANSWER_BODY
    assert collect(ApiKind.CHAT_COMPLETIONS, chunks) is None
    assert collect(ApiKind.CHAT_COMPLETIONS, chunks[:100]) == "word " * 100


def test_only_conversations_with_text_prompts_collect():
    assert answer_collector(request("/v1/chat/completions", {"model": "m", "messages": CHAT})) is not None
    first_turn = request("/v1/chat/completions", {"model": "m", "messages": CHAT[:2]})
    assert answer_collector(first_turn) is None  # resends no answer: a one-off question, most likely
    completion = request("/v1/completions", {"model": "m", "prompt": "<|assistant|> a completion"})
    assert answer_collector(completion) is None
    responses = request("/v1/responses", {"model": "m", "input": CHAT})
    assert answer_collector(responses) is None  # its turns are output items, not rendered by appending here
