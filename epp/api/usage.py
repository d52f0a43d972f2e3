"""Token usage from model-server responses, fed chunk by chunk as ext_proc delivers the body.

Usage::

    extractor = UsageExtractor(ApiKind.CHAT_COMPLETIONS)
    for chunk in body_chunks:
        extractor.feed(chunk, response_content_type)   # the same header value each time is fine
    usage = extractor.finish()                          # Usage, or None when the body reported none
    extractor.finished, extractor.outcome               # the API's final event seen? ("completed", ...)

The body framing is decided on the first ``feed`` with a non-empty chunk: ``text/event-stream`` in the
content type means SSE, any other content type means one JSON document; with no content type the
first non-blank byte decides (``{``/``[`` -> JSON, anything else -> SSE). Later content types are ignored.

Normalisation (OpenAI semantics: the prompt count includes cached tokens):
prompt = ``prompt_tokens`` or ``input_tokens``; completion = ``completion_tokens`` or ``output_tokens``;
cached = ``prompt_tokens_details.cached_tokens``, ``input_tokens_details.cached_tokens`` or Anthropic's
``cache_read_input_tokens``. Anthropic's ``input_tokens`` excludes cache reads and writes, so when a
usage object carries ``cache_read_input_tokens``/``cache_creation_input_tokens`` they are added to the
prompt count (vLLM's Anthropic endpoint sends neither, so its ``input_tokens`` is taken as is).

The end of a response as its API defines it (``finished``; ``outcome`` says how): SSE ``data: [DONE]``
(OpenAI chat/completions, vLLM generate), Anthropic ``message_stop``, Responses ``response.completed``,
``response.failed`` or ``response.incomplete``; a JSON body once ``content_length`` bytes arrived or, at
``finish``, when it decodes whole. EPP asks when the ext_proc stream closes before the body's end-of-stream
reached it: a client that stops reading at the final event and drops the connection (the OpenAI SDK does)
makes Envoy reset the stream before the model server's end-of-stream (the chunked terminator) arrives, yet
the response was complete. Nothing is searched per chunk for this: the last few KiB of the stream are kept
and read when asked, and a final event that carries usage is recognised when its usage is decoded.

Nothing here raises on bad input: garbage, truncated JSON or an oversized body yield ``None``.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from epp.api.types import ApiKind, Usage

_USAGE_KEY = b'"usage"'
_SNIFF_LIMIT = 64
_FULL_PARSE_LIMIT = 256 << 10  # above this, find the usage object instead of decoding e.g. embeddings
_MAX_USAGE_CANDIDATES = 8
_WHITESPACE = b" \t\r\n"
_DECODER = json.JSONDecoder()
_TAIL = 4096  # bytes of an SSE stream's end kept to recognise its final event
_DONE = b"[DONE]"
_FINAL_EVENTS = {"message_stop": "completed", "response.completed": "completed", "response.failed": "failed",
                 "response.incomplete": "incomplete"}
_FINAL_EVENT_NAMES = {name.encode(): outcome for name, outcome in _FINAL_EVENTS.items()}
_JSON_OUTCOMES = {"failed": "failed", "incomplete": "incomplete"}  # a Responses object's status


class _Framing(Enum):
    JSON = "json"
    SSE = "sse"


class UsageExtractor:
    """Collects the token usage a response reports. Feed every body chunk, then call ``finish`` once."""

    def __init__(self, api: ApiKind, max_buffer: int = 8 << 20, content_length: int | None = None) -> None:
        self.api = api
        self._max_buffer = max_buffer
        self._content_length = content_length  # the response's, when it declared one
        self._outcome: str | None = None
        self._last = self._prev = b""  # SSE: the last two runs of whole lines fed (at most _TAIL bytes each)
        self._framing: _Framing | None = None
        self._pieces: list[bytes] = []  # JSON: the body so far; SSE: the unfinished last line
        self._size = 0
        self._gave_up = False  # JSON body over the cap
        self._skip_line = False  # SSE line over the cap: ignore it up to its end
        self._usage = Usage()
        self._closed = False  # finish() was called

    def feed(self, chunk: bytes, content_type: str | None = None) -> None:
        if not chunk or self._closed:
            return
        if self._gave_up:
            self._size += len(chunk)  # still counted against content_length
            return
        if self._framing is None:
            self._framing = _choose_framing(content_type, chunk)
            if self._framing is None:
                return  # blank so far: meaningless in either framing
        if self._framing is _Framing.SSE:
            self._feed_sse(chunk)
        else:
            self._feed_json(chunk)

    def finish(self) -> Usage | None:
        if not self._closed:
            self._closed = True
            if self._framing is _Framing.JSON and not self._gave_up:
                usages, document = _usage_from_document(b"".join(self._pieces))
                self._merge_from(usages)
                if document is not None and self._outcome is None:  # decoded whole: the body is complete
                    self._outcome = _json_outcome(document) if self.api is ApiKind.RESPONSES else "completed"
            elif self._framing is _Framing.SSE and self._pieces and not self._skip_line:
                self._sse_line(b"".join(self._pieces))  # a last line without a newline
            self._pieces = []
        return None if self._usage.empty else self._usage

    @property
    def finished(self) -> bool:
        """Whether the response reached its API's final event (a JSON body: complete); see the module doc."""
        return self.outcome is not None

    @property
    def outcome(self) -> str | None:
        """With ``finished``: ``completed``, or Responses' ``failed`` / ``incomplete``; else None."""
        if self._outcome is None:
            if self._framing is _Framing.SSE:
                self._outcome = _final_event(self._prev, self._last)
            elif (self._framing is _Framing.JSON and self._content_length is not None
                  and self._size >= self._content_length):
                self._outcome = "completed"
        return self._outcome

    # ---------------------------------------------------------------------------------------- JSON

    def _feed_json(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_buffer:
            self._gave_up = True
            self._pieces = []
            return
        self._pieces.append(chunk)

    # ----------------------------------------------------------------------------------------- SSE

    def _feed_sse(self, chunk: bytes) -> None:
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if end < 0:
            self._hold(chunk)
            return
        complete = chunk[:end + 1] if end + 1 < len(chunk) else chunk
        if self._pieces:
            self._pieces.append(complete)
            complete = b"".join(self._pieces)
            self._pieces = []
        if self._skip_line:
            self._skip_line = False
            complete = _after_first_line_break(complete)
        self._size = 0
        if end + 1 < len(chunk):
            self._hold(chunk[end + 1:])
        if len(complete) > 4:  # whole lines, not just line breaks: the stream's tail, for ``outcome``
            self._prev = self._last
            self._last = complete if len(complete) <= _TAIL else complete[-_TAIL:]
        # Ordinary token events never mention usage: one C-speed scan and we are done with them.
        if _USAGE_KEY in complete:
            for line in complete.splitlines():
                self._sse_line(line)

    def _hold(self, piece: bytes) -> None:
        """Keep an unfinished line (lists, not concatenation: one huge line may come in many chunks)."""
        if self._skip_line:
            return
        self._size += len(piece)
        if self._size > self._max_buffer:
            self._pieces = []
            self._size = 0
            self._skip_line = True
            return
        self._pieces.append(piece)

    def _sse_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:]
        if data[:1] == b" ":
            data = data[1:]
        if not _mentions_usage_object(data):
            return  # also skips [DONE] and chunks carrying "usage": null
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._merge_from(_event_usages(event))
            if self._outcome is None:  # Responses' final events carry the usage: recognised here, for free
                kind = event.get("type")
                if isinstance(kind, str) and kind in _FINAL_EVENTS:
                    self._outcome = _FINAL_EVENTS[kind]

    def _merge_from(self, usages: list[Usage]) -> None:
        for usage in usages:
            self._usage.merge(usage)


def _choose_framing(content_type: str | None, chunk: bytes) -> _Framing | None:
    if content_type:
        return _Framing.SSE if "text/event-stream" in content_type.lower() else _Framing.JSON
    first = chunk[:_SNIFF_LIMIT].lstrip()[:1]
    if not first:
        return None
    return _Framing.JSON if first in (b"{", b"[") else _Framing.SSE


def _final_event(prev: bytes, last: bytes) -> str | None:
    """The outcome when the last event of an SSE stream's tail is its API's final event, else None."""
    tail = prev[len(last) - _TAIL:] + last if len(last) < _TAIL else last
    lines = tail.rstrip().splitlines()
    if len(tail) >= _TAIL and lines:
        lines = lines[1:]  # the first line may be cut: never read a fragment as a line
    seen_data = False  # an event is seen once its data is: an ``event:`` line alone is not enough
    for line in reversed(lines):  # the last event: its lines up to the blank line before it
        if not line.strip():
            break
        if line.startswith(b"event:"):
            outcome = _FINAL_EVENT_NAMES.get(line[6:].strip()) if seen_data else None
            if outcome is not None:
                return outcome
        elif line.startswith(b"data:"):
            seen_data = True
            data = line[5:].strip()
            if data == _DONE:
                return "completed"
            if data[:1] == b"{":
                try:
                    event = json.loads(data)
                except (ValueError, RecursionError):
                    continue
                kind = event.get("type") if isinstance(event, dict) else None
                if isinstance(kind, str) and kind in _FINAL_EVENTS:
                    return _FINAL_EVENTS[kind]
    return None


def _after_first_line_break(data: bytes) -> bytes:
    ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    return data[min(ends) + 1:] if ends else b""


def _mentions_usage_object(data: bytes) -> bool:
    """Whether ``"usage"`` is followed by ``:`` and ``{``: cheaper than decoding every such event."""
    position = data.find(_USAGE_KEY)
    while position >= 0:
        if _object_start_after_key(data, position + len(_USAGE_KEY)) >= 0:
            return True
        position = data.find(_USAGE_KEY, position + 1)
    return False


def _object_start_after_key(data: bytes, position: int) -> int:
    """Index of the ``{`` in ``: {`` starting at ``position`` (whitespace allowed), else -1."""
    size = len(data)
    while position < size and data[position] in _WHITESPACE:
        position += 1
    if position >= size or data[position] != 0x3A:  # ':'
        return -1
    position += 1
    while position < size and data[position] in _WHITESPACE:
        position += 1
    return position if position < size and data[position] == 0x7B else -1  # '{'


def _event_usages(event: dict[str, Any]) -> list[Usage]:
    """Usage objects of one decoded event/document, in the places each API puts them.

    Top-level ``usage``: OpenAI chat/completions (final or every chunk), Anthropic ``message_delta``,
    non-streaming bodies. ``response.usage``: Responses API ``response.completed`` (also incomplete/failed).
    ``message.usage``: Anthropic ``message_start``.
    """
    found: list[Usage] = []
    for holder in (event, event.get("response"), event.get("message")):
        if isinstance(holder, dict):
            usage = usage_from_object(holder.get("usage"))
            if usage is not None:
                found.append(usage)
    return found


def usage_from_object(raw: Any) -> Usage | None:
    """Normalise one usage object (OpenAI, Responses or Anthropic shape); None if it has no counts."""
    if not isinstance(raw, dict):
        return None
    prompt = _count(raw, "prompt_tokens")
    if prompt is None:
        prompt = _count(raw, "input_tokens")
        if prompt is not None:
            prompt += (_count(raw, "cache_read_input_tokens") or 0) + \
                (_count(raw, "cache_creation_input_tokens") or 0)
    completion = _count(raw, "completion_tokens")
    if completion is None:
        completion = _count(raw, "output_tokens")
    cached = _nested_count(raw, "prompt_tokens_details", "cached_tokens")
    if cached is None:
        cached = _nested_count(raw, "input_tokens_details", "cached_tokens")
    if cached is None:
        cached = _count(raw, "cache_read_input_tokens")
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
    return None if usage.empty else usage


def _count(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return value if type(value) is int and value >= 0 else None


def _nested_count(raw: dict[str, Any], outer: str, key: str) -> int | None:
    inner = raw.get(outer)
    return _count(inner, key) if isinstance(inner, dict) else None


def _json_outcome(document: Any) -> str:
    status = document.get("status") if isinstance(document, dict) else None
    return _JSON_OUTCOMES.get(status, "completed") if isinstance(status, str) else "completed"


def _usage_from_document(body: bytes) -> tuple[list[Usage], Any]:
    """The usage of a non-streaming JSON body, and the document when it was decoded whole (else None).

    Small bodies are decoded whole. Large ones (embeddings: megabytes of floats) are not: the usage
    object is located by its key, searching from the end where servers put it, and decoded alone (such a
    body is known complete only by its content-length).
    """
    if len(body) <= _FULL_PARSE_LIMIT:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return [], None
        return (_event_usages(document) if isinstance(document, dict) else []), document
    end = len(body)
    for _ in range(_MAX_USAGE_CANDIDATES):
        position = body.rfind(_USAGE_KEY, 0, end)
        if position < 0:
            break
        start = _object_start_after_key(body, position + len(_USAGE_KEY))
        if start >= 0:
            usage = _decode_object_at(body, start)
            if usage is not None:
                return [usage], None
        end = position
    return [], None


def _decode_object_at(body: bytes, start: int) -> Usage | None:
    try:
        raw, _ = _DECODER.raw_decode(body[start:].decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return usage_from_object(raw)
