"""Field checks and prompt-rendering helpers shared by the per-API request parsers.

Every check raises ``bad_request("invalid-field", ..., param)`` with ``param`` naming the offending
field as a path (``messages[2].content[0].text``) so a client can find it without guessing.
``null`` counts as absent for every optional field: OpenAI's and Anthropic's SDKs send explicit nulls.
"""

from __future__ import annotations

import json
from array import array
from typing import Any

import xxhash

from epp.api.errors import EppError, bad_request
from epp.api.types import ApiKind, ParsedBody

TOKEN_ID_LIMIT = 2**32  # token ids are uint32 on the wire in vLLM's generate API
# Client-chosen values EPP stores, labels, logs or computes with are bounded. A model name is a label on
# EPP's metrics and a field of every decision record: 256 characters is far beyond any served model name
# (Hugging Face repo ids are at most 96 + 1 + 96). Counts such as ``max_tokens`` stop at vLLM's int32.
MAX_MODEL_NAME_CHARS = 256
MAX_COUNT = 2**31 - 1

# An array typecode holding exactly 32 unsigned bits; building one range-checks ids in C.
_U32 = next(code for code in ("I", "L") if array(code).itemsize == 4)


def invalid(param: str, message: str) -> EppError:
    return bad_request("invalid-field", message, param)


def require_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model.strip():
        if model is None:
            message = "'model' is required"
        elif isinstance(model, str):
            message = "'model' must not be empty"
        else:
            message = f"'model' must be a string, got {json_type(model)}"
        raise bad_request("missing-model", message, "model")
    if len(model) > MAX_MODEL_NAME_CHARS:
        raise bad_request("model-name-too-long", f"'model' has {len(model)} characters; the limit is "
                          f"{MAX_MODEL_NAME_CHARS}", "model")
    if not model.isprintable():
        raise invalid("model", "'model' must not contain control characters")
    return model


def is_model_name(value: object) -> bool:
    """A string fit to be a model name: what ``require_model`` accepts. Paths EPP does not parse take the
    body's ``model`` only when it is one (they are never refused)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_MODEL_NAME_CHARS and value.isprintable()


def optional_bool(payload: dict[str, Any], key: str, param: str | None = None) -> bool | None:
    value = payload.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise invalid(param or key, f"'{param or key}' must be a boolean, got {json_type(value)}")


def optional_count(payload: dict[str, Any], key: str, param: str | None = None) -> int | None:
    """A non-negative integer such as ``max_tokens``, at most ``MAX_COUNT``; bools and integral floats are
    refused."""
    value = payload.get(key)
    if value is None:
        return None
    name = param or key
    if type(value) is not int:  # exact check: bool is a subclass of int
        raise invalid(name, f"'{name}' must be an integer, got {json_type(value)}")
    if value < 0:
        raise invalid(name, f"'{name}' must be >= 0")
    if value > MAX_COUNT:
        raise invalid(name, f"'{name}' must be <= {MAX_COUNT}")
    return value


def optional_str(payload: dict[str, Any], key: str, param: str | None = None) -> str | None:
    value = payload.get(key)
    if value is None or isinstance(value, str):
        return value
    name = param or key
    raise invalid(name, f"'{name}' must be a string, got {json_type(value)}")


def optional_list(payload: dict[str, Any], key: str, param: str | None = None) -> list[Any] | None:
    value = payload.get(key)
    if value is None or isinstance(value, list):
        return value
    name = param or key
    raise invalid(name, f"'{name}' must be an array, got {json_type(value)}")


def optional_object(payload: dict[str, Any], key: str, param: str | None = None) -> dict[str, Any] | None:
    value = payload.get(key)
    if value is None or isinstance(value, dict):
        return value
    name = param or key
    raise invalid(name, f"'{name}' must be an object, got {json_type(value)}")


def is_token_ids(values: list[Any]) -> bool:
    """True for a non-empty list of ints in [0, 2**32), checked in C: requests carry 100k-id prompts."""
    if not values or set(map(type, values)) != {int}:
        return False
    try:
        array(_U32, values)
    except OverflowError:
        return False
    return True


def common_fields(payload: dict[str, Any], api: ApiKind) -> ParsedBody:
    """The fields every JSON API shares: model (required), stream, cache_salt and the payload itself."""
    return ParsedBody(
        api=api,
        model=require_model(payload),
        stream=bool(optional_bool(payload, "stream")),
        cache_salt=optional_str(payload, "cache_salt"),
        payload=payload,
    )


def compact_json(value: Any) -> str:
    """Deterministic for a given input (client key order kept), so equal prefixes render equally."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def media_marker(kind: str, data: Any) -> str:
    """A short stable stand-in for an image/audio/video/file: equal media match, different media differ.

    Hashing instead of embedding the data keeps multi-MB base64 payloads out of ``prompt_text``.
    """
    raw = data if isinstance(data, str) else compact_json(data)
    return f"<|{kind}:{xxhash.xxh3_64_hexdigest(raw.encode('utf-8', 'surrogatepass'))}|>"


def role_marker(role: str) -> str:
    return f"<|{role}|>"


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def require_nonempty_list(payload: dict[str, Any], key: str) -> list[Any]:
    value = payload.get(key)
    if value is None:
        raise invalid(key, f"'{key}' is required")
    if not isinstance(value, list):
        raise invalid(key, f"'{key}' must be an array, got {json_type(value)}")
    if not value:
        raise invalid(key, f"'{key}' must not be empty")
    return value
