"""Chat requests of every API as the messages a model's chat template renders, and the rendering itself.

Chat completions, Responses (``instructions`` + ``input``) and Anthropic messages (``system`` + ``messages``)
with the same content become the same OpenAI-style message list, so they render to the same prompt -- as on a
vLLM pod, which serves all three through one template. Content parts are flattened the way vLLM does for
string-content templates (text parts joined by newlines).

Rendering follows transformers' ``render_jinja_template`` (what vLLM calls): a sandboxed Jinja2 environment with
``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols`` extension, HF's ``tojson`` (no HTML escaping,
``ensure_ascii=False``), ``raise_exception`` and ``strftime_now``; variables ``messages``, ``tools``,
``documents``, ``add_generation_prompt`` and the special tokens, plus ``chat_template_kwargs``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from epp.api.types import ApiKind, ParsedBody

CHAT_APIS = (ApiKind.CHAT_COMPLETIONS, ApiKind.RESPONSES, ApiKind.MESSAGES)


class NotRenderable(ValueError):
    """The request's messages do not have a shape the template can take."""


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise NotRenderable("content")
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") in ("tool_result", "function_call_output"):
                texts.append(_text(part.get("content", part.get("output"))))
            elif part.get("type") in ("image_url", "image", "input_image", "input_audio", "audio_url"):
                raise NotRenderable("multimodal content")  # the engine's placeholder tokens are model-specific
    return "\n".join(texts)


def _message(role: Any, content: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    if not isinstance(role, str):
        raise NotRenderable("role")
    msg: dict[str, Any] = {"role": role, "content": _text(content)}
    if extra:
        msg.update(extra)
    return msg


def chat_messages(body: ParsedBody) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(messages, template variables) of a chat-like request; None for other APIs. Raises NotRenderable."""
    doc = body.payload
    if body.api not in CHAT_APIS or not isinstance(doc, dict):
        return None
    messages: list[dict[str, Any]] = []
    if body.api == ApiKind.CHAT_COMPLETIONS:
        raw = doc.get("messages")
        if not isinstance(raw, list):
            raise NotRenderable("messages")
        for m in raw:
            if not isinstance(m, dict):
                raise NotRenderable("message")
            extra = {k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k) is not None}
            messages.append(_message(m.get("role"), m.get("content"), extra))
    elif body.api == ApiKind.RESPONSES:
        if isinstance(doc.get("instructions"), str):
            messages.append(_message("system", doc["instructions"]))
        inp = doc.get("input")
        if isinstance(inp, str):
            messages.append(_message("user", inp))
        elif isinstance(inp, list):
            for item in inp:
                if not isinstance(item, dict):
                    raise NotRenderable("input item")
                kind = item.get("type", "message")
                if kind == "message" or "role" in item:
                    messages.append(_message(item.get("role", "user"), item.get("content")))
                elif kind == "function_call_output":
                    messages.append(_message("tool", item.get("output")))
                elif kind != "reasoning":
                    raise NotRenderable(f"input item {kind!r}")
        else:
            raise NotRenderable("input")
    else:  # Anthropic messages
        system = doc.get("system")
        if system:
            messages.append(_message("system", system))
        raw = doc.get("messages")
        if not isinstance(raw, list):
            raise NotRenderable("messages")
        for m in raw:
            if not isinstance(m, dict):
                raise NotRenderable("message")
            messages.append(_message(m.get("role"), m.get("content")))
    if not messages:
        raise NotRenderable("no messages")
    variables: dict[str, Any] = {"add_generation_prompt": True}
    if body.api == ApiKind.CHAT_COMPLETIONS:
        for key in ("add_generation_prompt", "continue_final_message"):
            if isinstance(doc.get(key), bool):
                variables[key] = doc[key]
        kwargs = doc.get("chat_template_kwargs")
        if isinstance(kwargs, dict):
            variables.update({k: v for k, v in kwargs.items() if isinstance(k, str)})
        if isinstance(doc.get("documents"), list):
            variables["documents"] = doc["documents"]
    tools = doc.get("tools")
    if isinstance(tools, list) and tools:
        variables["tools"] = tools
    return messages, variables


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise NotRenderable(f"template: {message}")


@lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str, messages: list[dict[str, Any]], variables: dict[str, Any],
           special: dict[str, Any]) -> str:
    try:
        return compile_template(template).render(messages=messages, **special, **variables)
    except NotRenderable:
        raise
    except Exception as e:  # a template error is the request's problem, not EPP's
        raise NotRenderable(f"template: {type(e).__name__}: {e}") from None
