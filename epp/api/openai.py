"""OpenAI-family request parsers: /v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings.

Each parser validates only what routing relies on or what would make the request meaningless, and
renders ``prompt_text`` so that a conversation's rendering grows by appending: message i never depends
on a later message. Validation and rendering happen in one pass over the decoded payload.
"""

from __future__ import annotations

from typing import Any

from epp.api.fields import (
    common_fields,
    compact_json,
    invalid,
    is_token_ids,
    json_type,
    media_marker,
    optional_count,
    optional_list,
    optional_str,
    require_nonempty_list,
    role_marker,
)
from epp.api.types import ApiKind, ParsedBody

# --------------------------------------------------------------------------------------------------
# /v1/completions


def parse_completions(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.COMPLETIONS)
    parsed.max_output_tokens = optional_count(payload, "max_tokens")
    prompt = payload.get("prompt")
    if prompt is None and payload.get("prompt_embeds") is not None:
        return parsed  # vLLM accepts precomputed embeddings instead of a prompt: nothing to hash
    parsed.prompt_text, parsed.prompt_token_ids = _prompt_input(prompt, "prompt", allow_empty_string=True)
    return parsed


# --------------------------------------------------------------------------------------------------
# /v1/embeddings


def parse_embeddings(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.EMBEDDINGS)
    value = payload.get("input")
    if value is None and payload.get("messages") is not None:
        # vLLM's chat-style embedding request (multimodal embeddings) carries messages, not input.
        parsed.prompt_text = render_chat(payload)
        return parsed
    parsed.prompt_text, parsed.prompt_token_ids = _prompt_input(value, "input", allow_empty_string=False)
    return parsed


def _prompt_input(value: Any, name: str, *, allow_empty_string: bool) -> tuple[str | None, list[int] | None]:
    """string | list of strings | list of token ids | list of token-id lists -> (text, token ids).

    A batch renders as its items in order, so the first item's prefix is still a prefix of the whole.
    """
    if value is None:
        raise invalid(name, f"'{name}' is required")
    if isinstance(value, str):
        if not value and not allow_empty_string:
            raise invalid(name, f"'{name}' must not be empty")
        return value, None
    if not isinstance(value, list):
        raise invalid(name, f"'{name}' must be a string or an array, got {json_type(value)}")
    if not value:
        raise invalid(name, f"'{name}' must not be an empty array")
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise invalid(f"{name}[{i}]", f"'{name}' mixes strings with {json_type(item)}")
        return "\n".join(value), None
    if isinstance(first, list):
        ids: list[int] = []
        for i, item in enumerate(value):
            if not isinstance(item, list) or not is_token_ids(item):
                raise invalid(f"{name}[{i}]", _TOKEN_IDS_MESSAGE)
            ids.extend(item)
        return None, ids
    if not is_token_ids(value):
        raise invalid(name, f"'{name}' must be a string, an array of strings, or " + _TOKEN_IDS_MESSAGE)
    return None, value


_TOKEN_IDS_MESSAGE = "a non-empty array of token ids (integers in [0, 2^32))"

# --------------------------------------------------------------------------------------------------
# /v1/chat/completions


def parse_chat_completions(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.CHAT_COMPLETIONS)
    max_completion = optional_count(payload, "max_completion_tokens")
    max_tokens = optional_count(payload, "max_tokens")
    parsed.max_output_tokens = max_completion if max_completion is not None else max_tokens
    parsed.prompt_text = render_chat(payload)
    return parsed


def render_chat(payload: dict[str, Any]) -> str:
    """Validate ``messages`` (and ``tools``) and render them: json(tools), then per message role + content."""
    messages = require_nonempty_list(payload, "messages")
    parts: list[str] = []
    tools = optional_list(payload, "tools")
    if tools:
        parts.append(compact_json(tools))
    for i, message in enumerate(messages):
        _render_chat_message(message, i, parts)
    return "".join(parts)


def _render_chat_message(message: Any, i: int, parts: list[str]) -> None:
    # Error paths build their "messages[i]..." names lazily: this runs for every message of every request.
    if type(message) is not dict:
        raise invalid(f"messages[{i}]", f"'messages[{i}]' must be an object, got {json_type(message)}")
    role = message.get("role")
    if type(role) is not str or not role:
        raise invalid(f"messages[{i}].role", f"'messages[{i}].role' must be a non-empty string")
    parts.append(role_marker(role))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if type(reasoning) is str:
        parts.append(reasoning)
    content = message.get("content")
    if type(content) is str:
        parts.append(content)
    elif type(content) is list:
        for j, block in enumerate(content):
            parts.append(_chat_block_text(block, i, j))
    elif content is not None:
        raise invalid(f"messages[{i}].content", f"'messages[{i}].content' must be a string, an array of "
                      f"content parts or null, got {json_type(content)}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if type(tool_calls) is not list:
            raise invalid(f"messages[{i}].tool_calls", f"'messages[{i}].tool_calls' must be an array")
        for call in tool_calls:
            parts.append(_tool_call_text(call))


def _tool_call_text(call: Any) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return "<|tool_call|>" + compact_json(call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = compact_json(arguments)
    return f"<|tool_call|>{function.get('name')}{arguments}"


# Content parts whose text is the part itself: rendered verbatim.
_TEXT_FIELDS = {"text": "text", "refusal": "refusal", "input_text": "text", "output_text": "text"}
# Media parts: a placeholder hashed from where the data lives.
_MEDIA_FIELDS = {"image_url": "image", "video_url": "video", "audio_url": "audio", "input_audio": "audio",
                 "file": "file", "image_embeds": "image"}


def _chat_block_text(block: Any, i: int, j: int) -> str:
    if type(block) is not dict:
        where = f"messages[{i}].content[{j}]"
        raise invalid(where, f"'{where}' must be an object, got {json_type(block)}")
    kind = block.get("type")
    text_field = _TEXT_FIELDS.get(kind) if type(kind) is str else None
    if text_field is not None:
        text = block.get(text_field)
        if type(text) is not str:
            where = f"messages[{i}].content[{j}].{text_field}"
            raise invalid(where, f"'{where}' must be a string")
        return text
    if type(kind) is not str:
        where = f"messages[{i}].content[{j}].type"
        raise invalid(where, f"'{where}' must be a string")
    media = _MEDIA_FIELDS.get(kind)
    if media is not None:
        return media_marker(media, _media_source(block.get(kind)))
    return media_marker(kind, block)  # unknown part types still render stably, never refused


def _media_source(value: Any) -> Any:
    """The part of a media object that identifies the media (URL or inline data), not its options."""
    if isinstance(value, dict):
        for key in ("url", "data", "file_data", "file_id"):
            source = value.get(key)
            if isinstance(source, str):
                return source
    return value


# --------------------------------------------------------------------------------------------------
# /v1/responses


def parse_responses(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.RESPONSES)
    parsed.max_output_tokens = optional_count(payload, "max_output_tokens")
    # Rendered as chat and Anthropic messages are (tools, then the system message, then the turns): the model
    # server renders `instructions` as the system message, so the same content keys the same prefix whichever
    # API carried it.
    parts: list[str] = []
    tools = optional_list(payload, "tools")
    if tools:
        parts.append(compact_json(tools))
    instructions = optional_str(payload, "instructions")
    if instructions:
        parts.append(role_marker("system") + instructions)
    value = payload.get("input")
    if isinstance(value, str):
        parts.append(role_marker("user") + value)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            parts.append(_response_item_text(item, f"input[{i}]"))
    elif value is None:
        raise invalid("input", "'input' is required")
    else:
        raise invalid("input", f"'input' must be a string or an array of items, got {json_type(value)}")
    parsed.prompt_text = "".join(parts)
    return parsed


def _response_item_text(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise invalid(where, f"'{where}' must be an object, got {json_type(item)}")
    kind = item.get("type")
    role = item.get("role")
    if kind in (None, "message") and role is not None:
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role", f"'{where}.role' must be a non-empty string")
        return role_marker(role) + _response_content_text(item.get("content"), f"{where}.content")
    if kind == "function_call":
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            arguments = compact_json(arguments)
        return f"<|function_call|>{item.get('name')}{arguments}"
    if kind == "function_call_output":
        output = item.get("output")
        return "<|function_call_output|>" + (output if isinstance(output, str) else compact_json(output))
    if not isinstance(kind, str):
        raise invalid(f"{where}.type", f"'{where}' needs a 'role' or a string 'type'")
    # reasoning, item_reference, *_call items, ...: stable by construction, never refused.
    return f"<|{kind}|>" + compact_json(item)


_RESPONSE_MEDIA = {"input_image": ("image", ("image_url", "file_id")),
                   "input_audio": ("audio", ("input_audio", "data")),
                   "input_file": ("file", ("file_data", "file_id", "file_url", "filename"))}


def _response_content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, f"'{where}' must be a string or an array of content parts, "
                      f"got {json_type(content)}")
    pieces: list[str] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(here, f"'{here}' must be an object with a string 'type'")
        kind = part["type"]
        media = _RESPONSE_MEDIA.get(kind)
        if media is not None:
            label, keys = media
            source = next((part[key] for key in keys if part.get(key) is not None), part)
            pieces.append(media_marker(label, _media_source(source)))
        elif kind in _TEXT_FIELDS:
            field = _TEXT_FIELDS[kind]
            text = part.get(field)
            if not isinstance(text, str):
                raise invalid(f"{here}.{field}", f"'{here}.{field}' must be a string")
            pieces.append(text)
        else:
            pieces.append(media_marker(kind, part))
    return "".join(pieces)
