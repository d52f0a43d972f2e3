"""A conversation's continuation: the assistant's answer in a response body, rendered as the next turn sends it.

A client continuing a conversation resends the answer as an assistant message. EPP renders chat and Anthropic
messages by appending (epp/api/openai.py, epp/api/anthropic.py: a role marker, then the content), so the next
turn's prompt text begins with this request's prompt text, the assistant's role marker and the answer. The model
server caches the answer's blocks with the prompt's; a prefix index that learns this text predicts the next turn's
hit in full, not short by the answer.

Usage (a plugin's ``on_response_body`` feeds, ``on_response_complete`` reads)::

    answer = AnswerCollector(request.api)        # or None: answer_collector(request)
    answer.feed(chunk)                           # every response body chunk: an append, nothing parsed
    text = continuation_text(request, answer.text())   # None when the answer is not plain text

Only text answers continue: one choice, no tool calls, no reasoning or thinking (the server generated those
first, so its cached blocks after the prompt are not the content the client resends). Bodies past
``MAX_ANSWER_BODY`` bytes are dropped (a long answer's continuation is left unknown, as before this module);
nothing here raises on bad input.

What the server holds is the answer's tokens as it generated them; the next turn's prompt holds them as the
resent text encodes. They agree where the tokenizer round-trips its own output (the usual case). Where they do
not, the index predicts the next turn a little long (by the answer), and when the answer is a large part of the
conversation (over a quarter of its tokens) the producer's ``cached_tokens`` feedback takes the shortfall for
eviction.
"""

from __future__ import annotations

import json
from typing import Any

from epp.api.fields import role_marker
from epp.api.types import ApiKind, InferenceRequest

MAX_ANSWER_BODY = 64 << 10  # bytes of a response kept per request (SSE framing: ~300 tokens of chat answer)
_ASSISTANT = role_marker("assistant")
_RENDERED_BY_APPENDING = (ApiKind.CHAT_COMPLETIONS, ApiKind.MESSAGES)


class _NotText(Exception):
    """The answer holds something other than text (a tool call, a thinking block, several choices)."""


def answer_collector(request: InferenceRequest) -> AnswerCollector | None:
    """A collector for a request whose answer the next turn would resend: a chat or Anthropic conversation
    (it resends an earlier answer already), with a text prompt."""
    body = request.body
    if request.api not in _RENDERED_BY_APPENDING or not body.prompt_text or body.prompt_token_ids is not None:
        return None
    # the messages' roles, not a search of the rendered text: a one-off 220 KB prompt took ~50 us to search
    messages = body.payload.get("messages") if body.payload is not None else None
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                 for m in messages):
        return None
    return AnswerCollector(request.api)


def continuation_text(request: InferenceRequest, answer: str | None) -> str | None:
    """The next turn's prompt text up to its new message: the prompt, the assistant's marker, the answer."""
    if not answer or request.api not in _RENDERED_BY_APPENDING or not request.body.prompt_text:
        return None
    return request.body.prompt_text + _ASSISTANT + answer


class AnswerCollector:
    __slots__ = ("api", "chunks", "size")

    def __init__(self, api: ApiKind) -> None:
        self.api = api
        self.chunks: list[bytes] | None = []  # None: over the limit, given up
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        chunks = self.chunks
        if chunks is None or not chunk:
            return
        self.size += len(chunk)
        if self.size > MAX_ANSWER_BODY:
            self.chunks = None
            return
        chunks.append(chunk)

    def text(self) -> str | None:
        """The answer's text, or None (not text, over the limit, unreadable)."""
        if not self.chunks:
            return None
        body = b"".join(self.chunks)
        try:
            if body.lstrip()[:1] == b"{":
                return _json_answer(self.api, json.loads(body))
            return _sse_answer(self.api, body)
        except (_NotText, ValueError, RecursionError, TypeError, AttributeError, KeyError, IndexError):
            return None


def _json_answer(api: ApiKind, doc: Any) -> str | None:
    if api is ApiKind.CHAT_COMPLETIONS:
        choices = doc["choices"]
        if len(choices) != 1:
            raise _NotText
        message = choices[0]["message"]
        if message.get("tool_calls") or message.get("reasoning_content") or message.get("reasoning"):
            raise _NotText
        content = message.get("content")
        return content if isinstance(content, str) else None
    parts = []
    for block in doc["content"]:
        if block.get("type") != "text":
            raise _NotText
        parts.append(block["text"])
    return "".join(parts)


def _sse_answer(api: ApiKind, body: bytes) -> str | None:
    parts: list[str] = []
    for line in body.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data.startswith(b"{"):
            continue  # [DONE]
        event = json.loads(data)
        if api is ApiKind.CHAT_COMPLETIONS:
            for choice in event.get("choices") or ():
                if choice.get("index", 0) != 0:
                    raise _NotText
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning"):
                    raise _NotText
                content = delta.get("content")
                if isinstance(content, str):
                    parts.append(content)
        else:
            kind = event.get("type")
            if kind == "content_block_start" and (event.get("content_block") or {}).get("type") != "text":
                raise _NotText
            if kind == "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") != "text_delta":
                    raise _NotText
                parts.append(delta["text"])
    return "".join(parts)
