"""Request parsing entry point: choose the API by path suffix, decode the body once, run its parser.

Path dispatch follows llm-d-router: longest matching path-segment suffix, query string stripped,
empty segments (trailing or doubled slashes) ignored, so gateway prefixes such as
``/<model>/v1/chat/completions`` work. Paths no parser claims are ``ApiKind.OTHER``: routed by load
alone, never refused, with ``model``/``stream`` picked up when the body happens to carry them.

Reasons raised (``EppError``, 400 unless noted): ``empty-body``, ``invalid-utf8``, ``invalid-json``,
``json-too-deep``, ``not-an-object``, ``missing-model`` and ``invalid-field`` (``param`` names the field);
415 ``unsupported-media-type`` when an undecodable body was declared as something other than JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from epp.api import anthropic, openai, vllm
from epp.api.errors import EppError, bad_request
from epp.api.fields import is_model_name
from epp.api.types import ApiKind, ParsedBody
from epp.config import Config

DEFAULT_MAX_JSON_DEPTH = Config.max_json_depth  # --max-json-depth's

# Longest suffix first so "chat/completions" wins over "completions" and
# "messages/count_tokens" over "messages".
_ROUTES: tuple[tuple[tuple[str, ...], ApiKind], ...] = tuple(sorted(
    (
        (("completions",), ApiKind.COMPLETIONS),
        (("chat", "completions"), ApiKind.CHAT_COMPLETIONS),
        (("responses",), ApiKind.RESPONSES),
        (("embeddings",), ApiKind.EMBEDDINGS),
        (("messages",), ApiKind.MESSAGES),
        (("messages", "count_tokens"), ApiKind.COUNT_TOKENS),
        (("inference", "v1", "generate"), ApiKind.GENERATE),
    ),
    key=lambda route: -len(route[0]),
))

_PARSERS: dict[ApiKind, Callable[[dict[str, Any]], ParsedBody]] = {
    ApiKind.COMPLETIONS: openai.parse_completions,
    ApiKind.CHAT_COMPLETIONS: openai.parse_chat_completions,
    ApiKind.RESPONSES: openai.parse_responses,
    ApiKind.EMBEDDINGS: openai.parse_embeddings,
    ApiKind.MESSAGES: anthropic.parse_messages,
    ApiKind.COUNT_TOKENS: anthropic.parse_count_tokens,
    ApiKind.GENERATE: vllm.parse_generate,
}


def api_for_path(path: str) -> ApiKind:
    """The API a request path names; ``ApiKind.OTHER`` when no known suffix matches."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    segments = [segment for segment in path.split("/") if segment]
    for suffix, api in _ROUTES:
        if len(segments) >= len(suffix) and tuple(segments[-len(suffix):]) == suffix:
            return api
    return ApiKind.OTHER


def parse_request(path: str, body: bytes, content_type: str | None,
                  max_json_depth: int = DEFAULT_MAX_JSON_DEPTH, content_encoding: str | None = None) -> ParsedBody:
    """Parse a request body for the API its path names. Raises ``EppError`` (400, 415) for invalid bodies.

    Known APIs are read as JSON whatever the client declared: a body that is JSON is routed even when
    labelled ``text/plain`` (policing Content-Type is the model server's call: SGLang accepts such
    requests, vLLM refuses them). Only a body that is *not* JSON and was declared as something else
    (``multipart/form-data``, ``text/plain``, ``application/octet-stream``, ...) or sent with a
    ``Content-Encoding`` (``gzip``: EPP never decompresses) is refused as 415 ``unsupported-media-type``,
    which tells the client what to fix better than 400 ``invalid-json``. For OTHER paths the content
    type only guides the search for ``model`` (multipart uploads); their bodies are never refused.
    """
    api = api_for_path(path)
    if api is ApiKind.OTHER:
        return _parse_other(body, content_type, max_json_depth)
    try:
        payload = decode_json_object(body, max_json_depth)
    except EppError as e:
        if e.reason in _UNDECODABLE:
            unsupported = _unsupported_media(content_type, content_encoding)
            if unsupported:
                raise EppError(415, "unsupported-media-type", f"{unsupported}; this API takes a JSON object "
                               "(Content-Type: application/json, no Content-Encoding)") from None
        raise
    return _PARSERS[api](payload)


_UNDECODABLE = frozenset({"invalid-utf8", "invalid-json", "not-an-object"})


def _unsupported_media(content_type: str | None, content_encoding: str | None) -> str | None:
    """Why a declared media type / encoding explains an undecodable body; None when it does not."""
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        return f"request body has Content-Encoding {encoding!r}, which the endpoint picker does not decode"
    media_type, _ = _split_content_type(content_type)
    if media_type and not (media_type == "application/json" or media_type.endswith("+json")
                           or media_type == "text/json"):
        return f"request body is {media_type!r}, not JSON"
    return None


# --------------------------------------------------------------------------------------------------
# JSON decoding with a depth guard


def decode_json_object(body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """Decode a UTF-8 JSON object nesting at most ``max_depth`` arrays/objects deep.

    Depth is guarded twice, cheaply. While decoding, CPython's JSON scanner counts its own recursion
    and raises ``RecursionError`` near the interpreter limit, so a 100k-level attack stops after ~1000
    levels; we turn that into ``json-too-deep``. After decoding, the policy limit is checked exactly by
    walking containers, not bytes: at once when the value holds few elements (a chat request, however long
    its prompt), else only when the body has more openers than ``max_depth`` (one C-speed ``translate``,
    ~70 µs on 220 KB, skipped for the former), which ordinary bodies do not.
    """
    if not body or body.isspace():  # isspace, unlike strip, never copies a multi-MB body
        raise bad_request("empty-body", "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request("invalid-utf8", f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise bad_request("json-too-deep", f"request JSON nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int-digit-limit errors on absurd numbers
        raise bad_request("invalid-json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad_request("not-an-object", f"request body must be a JSON object, got {_json_kind(value)}")
    deep = nesting_exceeds(value, max_depth, _WALK_BUDGET)
    if deep is None:  # many elements (token ids, many messages): walk them only if the openers allow the depth
        deep = len(body.translate(None, _NOT_OPENER)) > max_depth and nesting_exceeds(value, max_depth)
    if deep:
        raise bad_request("json-too-deep", f"request JSON nests deeper than {max_depth} levels")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # what json.loads(..., parse_constant=) builds per call


_NOT_OPENER = bytes(b for b in range(256) if b not in b"[{")
_WALK_BUDGET = 256  # elements walked before asking the body's openers first


def nesting_exceeds(value: Any, max_depth: int, budget: int | None = None) -> bool | None:
    """Whether a decoded JSON value nests arrays/objects deeper than ``max_depth`` (iterative, no recursion);
    None when the containers hold more than ``budget`` elements before that is known.

    A top-level object is depth 1.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        container, depth = pop()
        if depth > max_depth:
            return True
        if budget is not None:
            budget -= len(container)
            if budget < 0:
                return None
        for child in container.values() if type(container) is dict else container:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, depth + 1))
    return False


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


# --------------------------------------------------------------------------------------------------
# Paths no parser claims


def _parse_other(body: bytes, content_type: str | None, max_depth: int) -> ParsedBody:
    parsed = ParsedBody(api=ApiKind.OTHER)
    if not body:
        return parsed
    media_type, params = _split_content_type(content_type)
    if media_type == "multipart/form-data":
        boundary = params.get("boundary")
        if boundary:
            _multipart_fields(body, boundary.encode("latin-1", "replace"), parsed)
        return parsed
    if body[:64].lstrip()[:1] != b"{":
        return parsed  # not a JSON object: forward untouched
    try:
        payload = decode_json_object(body, max_depth)
    except EppError:  # unparseable bodies on paths we do not own are simply forwarded
        return parsed
    parsed.payload = payload
    model = payload.get("model")
    if is_model_name(model):
        parsed.model = model
    stream = payload.get("stream")
    if isinstance(stream, bool):
        parsed.stream = stream
    return parsed


def _split_content_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    media_type, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return media_type.strip().lower(), params


_MAX_FORM_VALUE = 1024  # model names and flags are short; longer values are not what we look for
_MAX_PART_HEADERS = 4096  # a part's headers are a few lines
_WANTED_FORM_FIELDS = frozenset({"model", "stream"})


def _multipart_fields(body: bytes, boundary: bytes, parsed: ParsedBody) -> None:
    """Pick ``model`` and ``stream`` form fields out of a multipart body without copying file parts."""
    fields = _small_form_fields(body, boundary, _WANTED_FORM_FIELDS)
    if is_model_name(fields.get("model")):
        parsed.model = fields["model"]
    if "stream" in fields:
        parsed.stream = fields["stream"].strip().lower() in ("true", "1")


def _small_form_fields(body: bytes, boundary: bytes, wanted: frozenset[str]) -> dict[str, str]:
    """Values of the ``wanted`` form fields, walking part to part.

    Each step is a C-speed ``find`` for the next boundary, so file parts are skipped, never copied,
    and the walk is linear in the body whatever the parts contain. Only headers and wanted values
    (bounded in size) are copied out.
    """
    delimiter = b"\r\n--" + boundary
    found: dict[str, str] = {}
    position = body.find(delimiter[2:])  # the first boundary may open the body without a CRLF
    while position >= 0 and len(found) < len(wanted):
        headers_start = position + len(delimiter) - 2
        if body[headers_start:headers_start + 2] == b"--":
            break  # closing boundary
        headers_end = body.find(b"\r\n\r\n", headers_start, headers_start + _MAX_PART_HEADERS)
        if headers_end < 0:
            break
        value_start = headers_end + 4
        name = _form_field_name(body[headers_start:headers_end])
        if name in wanted:
            value_end = body.find(delimiter, value_start, value_start + _MAX_FORM_VALUE + len(delimiter))
            if value_end >= 0:
                found[name] = body[value_start:value_end].decode("utf-8", "replace")
        position = body.find(delimiter, value_start)
        if position >= 0:
            position += 2
    return found


def _form_field_name(headers: bytes) -> str | None:
    for line in headers.split(b"\r\n"):
        header, _, value = line.partition(b":")
        if header.strip().lower() != b"content-disposition":
            continue
        for param in value.split(b";")[1:]:
            key, _, raw = param.partition(b"=")
            if key.strip().lower() == b"name":
                return raw.strip().strip(b'"').decode("utf-8", "replace")
    return None
