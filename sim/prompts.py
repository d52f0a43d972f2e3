"""Render chat-like requests (OpenAI chat, Responses, Anthropic messages) into one prompt string.

The template is deliberately simple and prefix-stable: tools first, then one `<|role|>text<|end|>` per
message, then the generation prompt `<|assistant|>`. A conversation that grows by turns renders to a string
that starts with the previous turn's prompt plus the answer, which is what makes multi-turn prefix caching
(and prefix-aware routing) measurable.
"""

from __future__ import annotations

import json
from typing import Any

from epp_sim.errors import ApiError

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _text_of(content: Any, where: str) -> str:
    """Flatten message content (string or list of typed parts) to text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                ptype = part.get("type")
                if "text" in part and isinstance(part["text"], str):
                    out.append(part["text"])
                elif ptype in ("image_url", "image", "input_image"):
                    out.append("<|image|>")
                elif ptype in ("input_audio", "audio_url"):
                    out.append("<|audio|>")
                elif ptype in ("tool_result", "function_call_output"):
                    out.append(_text_of(part.get("content", part.get("output")), where))
                elif ptype in ("tool_use", "function_call"):
                    out.append(json.dumps({"name": part.get("name"), "input": part.get("input",
                                           part.get("arguments"))}, sort_keys=True))
                elif ptype in ("thinking", "reasoning"):
                    out.append(str(part.get("thinking", "")))
            else:
                raise ApiError(400, f"{where}: content parts must be objects or strings")
        return "".join(out)
    if isinstance(content, dict):
        return _text_of([content], where)
    raise ApiError(400, f"{where}: content must be a string or a list of content parts")


def _tools_header(tools: Any) -> str:
    if not tools:
        return ""
    if not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", param="tools")
    return "<|tools|>" + json.dumps(tools, sort_keys=True, separators=(",", ":")) + "<|end|>"


def render_chat(messages: Any, tools: Any = None, add_generation_prompt: bool = True) -> str:
    return "".join(chat_segments(messages, tools, add_generation_prompt))


def chat_segments(messages: Any, tools: Any = None, add_generation_prompt: bool = True) -> list[str]:
    """The rendered prompt as pieces (tools, one per message, generation prompt) whose tokens concatenate
    to the tokens of the whole: tokenisers can cache repeated pieces such as system prompts."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    header = _tools_header(tools)
    out = [header] if header else []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        role = msg.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(_ROLES)}", param="messages")
        text = _text_of(msg.get("content"), f"messages[{i}]")
        calls = msg.get("tool_calls")
        if calls:
            text += json.dumps(calls, sort_keys=True, separators=(",", ":"))
        role = "system" if role == "developer" else ("tool" if role == "function" else role)
        out.append(f"<|{role}|>{text}<|end|>")
    if add_generation_prompt:
        out.append("<|assistant|>")
    return out


def responses_segments(body: dict[str, Any]) -> list[str]:
    """OpenAI Responses API: `instructions` + `input` (string or list of items)."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise ApiError(400, f"input[{i}] must be an object", param="input")
            itype = item.get("type", "message")
            if itype == "message" or "role" in item:
                messages.append({"role": item.get("role", "user"), "content": item.get("content")})
            elif itype == "function_call":
                messages.append({"role": "assistant", "content": [item]})
            elif itype == "function_call_output":
                messages.append({"role": "tool", "content": item.get("output")})
            elif itype == "reasoning":
                continue
            else:
                raise ApiError(400, f"input[{i}].type {itype!r} is not supported", param="input")
    else:
        raise ApiError(400, "input must be a string or a non-empty list", param="input")
    return chat_segments(messages, body.get("tools"))


def anthropic_segments(body: dict[str, Any]) -> list[str]:
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: messages must contain at least one item", param="messages")
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant", "system"):
            raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'", param="messages")
        messages.append({"role": msg["role"], "content": msg.get("content")})
    tools = body.get("tools")
    return chat_segments(messages, tools)
