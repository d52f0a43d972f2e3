"""Anthropic Messages API parsers: /v1/messages and /v1/messages/count_tokens.

Rendering for prefix matching: json(tools), then the system prompt, then per message a role marker and
its blocks (text, thinking, tool_use name + input JSON, tool_result content; media as hashed markers).
"""

from __future__ import annotations

from typing import Any

from epp.api.fields import (
    common_fields,
    compact_json,
    invalid,
    json_type,
    media_marker,
    optional_count,
    optional_list,
    require_nonempty_list,
    role_marker,
)
from epp.api.types import ApiKind, ParsedBody


def parse_messages(payload: dict[str, Any]) -> ParsedBody:
    parsed = common_fields(payload, ApiKind.MESSAGES)
    # max_tokens is required by Anthropic's API; we check its type only and let the server refuse absence.
    parsed.max_output_tokens = optional_count(payload, "max_tokens")
    parsed.prompt_text = render_messages(payload)
    return parsed


def parse_count_tokens(payload: dict[str, Any]) -> ParsedBody:
    """Same body as /v1/messages; the answer is a token count, so there is no usage to learn from it."""
    parsed = common_fields(payload, ApiKind.COUNT_TOKENS)
    parsed.prompt_text = render_messages(payload)
    parsed.skip_response = True
    return parsed


def render_messages(payload: dict[str, Any]) -> str:
    messages = require_nonempty_list(payload, "messages")
    parts: list[str] = []
    tools = optional_list(payload, "tools")
    if tools:
        parts.append(compact_json(tools))
    system = payload.get("system")
    if system is not None:
        parts.append(role_marker("system"))
        _render_content(system, "system", parts)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"'{where}' must be an object, got {json_type(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role", f"'{where}.role' must be a non-empty string")
        parts.append(role_marker(role))
        _render_content(message.get("content"), f"{where}.content", parts)
    return "".join(parts)


def _render_content(content: Any, where: str, parts: list[str]) -> None:
    if isinstance(content, str):
        parts.append(content)
        return
    if not isinstance(content, list):
        raise invalid(where, f"'{where}' must be a string or an array of content blocks, "
                      f"got {json_type(content)}")
    for j, block in enumerate(content):
        parts.append(_block_text(block, f"{where}[{j}]"))


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict):
        raise invalid(where, f"'{where}' must be an object, got {json_type(block)}")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise invalid(f"{where}.type", f"'{where}.type' must be a string")
    if kind == "text":
        return _string_field(block, "text", where)
    if kind == "thinking":
        return _string_field(block, "thinking", where)
    if kind == "tool_use":
        return f"<|tool_use|>{block.get('name')}{compact_json(block.get('input'))}"
    if kind == "tool_result":
        return "<|tool_result|>" + _tool_result_text(block.get("content"), f"{where}.content")
    if kind in ("image", "document"):
        return media_marker(kind, _source_identity(block.get("source")))
    if kind == "redacted_thinking":
        return media_marker(kind, block.get("data"))
    # server_tool_use, search_result, container_upload, ...: stable by construction, never refused.
    return media_marker(kind, block)


def _tool_result_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    parts: list[str] = []
    _render_content(content, where, parts)
    return "".join(parts)


def _string_field(block: dict[str, Any], key: str, where: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise invalid(f"{where}.{key}", f"'{where}.{key}' must be a string")
    return value


def _source_identity(source: Any) -> Any:
    """What identifies an image/document: its inline data, URL or file id (not the media type)."""
    if isinstance(source, dict):
        for key in ("data", "url", "file_id"):
            value = source.get(key)
            if isinstance(value, str):
                return value
    return source
