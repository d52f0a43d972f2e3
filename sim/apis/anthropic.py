"""Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) as vLLM serves it.

Usage follows Anthropic's convention: `input_tokens` counts the prompt tokens that were *not* read from
the cache and `cache_read_input_tokens` the ones that were, so input_tokens + cache_read_input_tokens is
the prompt length. (vLLM itself reports the whole prompt as input_tokens and no cache field.)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from epp_sim.apis.base import (
    Pod,
    SseWriter,
    Submission,
    before_engine,
    check_length,
    json_response,
    require_object,
    resolve_model,
    run_to_end,
    sse_event,
    stream_flag,
    stream_many,
    submit_all,
)
from epp_sim.engine import SimRequest
from epp_sim.errors import ApiError
from epp_sim.prompts import anthropic_segments

_STOP = {"length": "max_tokens", "stop": "end_turn", "abort": "end_turn"}


def _usage(req: SimRequest, output_tokens: int) -> dict[str, int]:
    cached = req.cached_tokens or 0
    return {"input_tokens": req.num_prompt - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _parse(pod: Pod, body: dict[str, Any]) -> tuple[str, str | None, list[int]]:
    model, lora = resolve_model(pod, body, required=True)
    prompt = pod.tokenizer.encode_segments(anthropic_segments(body))
    return model, lora, prompt


def parse_messages(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora, prompt = _parse(pod, body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise ApiError(400, "max_tokens: Field required", param="max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "max_tokens: max_tokens must be positive", param="max_tokens")
    stream = stream_flag(body)
    return Submission(body=body, model=model, lora=lora, prompts=[prompt],
                      max_tokens=[check_length(pod, len(prompt), max_tokens, True)], stream=stream)


async def messages(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_messages(pod, doc)
    model = sub.model
    await before_engine(pod)
    req, = submit_all(pod, request, sub)
    mid = f"msg_{req.rid}"
    if not sub.stream:
        await run_to_end(pod, [req])
        return json_response({
            "id": mid, "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": "".join(req.output_text[:req.num_output])}],
            "model": model, "stop_reason": _STOP.get(req.finish_reason or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(req, req.num_output),
        })

    w = await SseWriter(pod, request).open()
    texts = req.output_text
    async for _, start, end in stream_many([req]):
        parts: list[bytes] = []
        if start == 0:  # sent at the first token, when the prefix-cache hit is known
            parts.append(sse_event("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "content": [], "model": model,
                "stop_reason": None, "stop_sequence": None, "usage": _usage(req, 0)}}))
            parts.append(sse_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                           "content_block": {"type": "text", "text": ""}}))
        for k in range(start, end):
            parts.append(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                         b'"delta":{"type":"text_delta","text":' + json.dumps(texts[k]).encode() + b"}}\n\n")
        await w.write(b"".join(parts), token_events=end - start)
    await w.write(
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP.get(req.finish_reason or "stop", "end_turn"),
                      "stop_sequence": None},
            "usage": _usage(req, req.num_output)})
        + sse_event("message_stop", {"type": "message_stop"}))
    return await w.close()


async def count_tokens(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    body = require_object(doc)
    _, _, prompt = _parse(pod, body)
    n = len(prompt)
    return json_response({"input_tokens": n, "context_management": {"original_input_tokens": n}})
