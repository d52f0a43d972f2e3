"""OpenAI Responses API (`POST /v1/responses`), streaming as `event: <type>` + `data: {...}` pairs."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from epp_sim.apis.base import (
    Pod,
    SseWriter,
    Submission,
    before_engine,
    cache_salt_of,
    check_length,
    json_response,
    max_tokens_of,
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
from epp_sim.prompts import responses_segments


def _usage(req: SimRequest) -> dict[str, Any]:
    return {"input_tokens": req.num_prompt, "input_tokens_details": {"cached_tokens": req.cached_tokens or 0},
            "output_tokens": req.num_output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": req.num_prompt + req.num_output}


def _message(item_id: str, text: str | None) -> dict[str, Any]:
    if text is None:
        return {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    return {"id": item_id, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _response(rid: str, created: int, model: str, body: dict[str, Any], req: SimRequest | None,
              max_tokens: int | None, item_id: str) -> dict[str, Any]:
    done = req is not None and req.finished
    status = "in_progress"
    incomplete = None
    output: list[dict[str, Any]] = []
    if done and req is not None:
        status = "completed"
        if req.finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        output = [_message(item_id, "".join(req.output_text[:req.num_output]))]
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None, "incomplete_details": incomplete, "instructions": body.get("instructions"),
        "max_output_tokens": max_tokens, "max_tool_calls": None, "metadata": body.get("metadata") or {},
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "prompt": None, "reasoning": None, "service_tier": "auto", "store": False,
        "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": _usage(req) if done and req is not None else None, "user": None,
    }


def parse_responses(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    stream = stream_flag(body)
    if "input" not in body:
        raise ApiError(400, "input: Field required", param="input")
    prompt = pod.tokenizer.encode_segments(responses_segments(body))
    max_tokens, explicit = max_tokens_of(pod, body, "max_output_tokens")
    return Submission(body=body, model=model, lora=lora, prompts=[prompt],
                      max_tokens=[check_length(pod, len(prompt), max_tokens, explicit)], explicit=explicit,
                      stream=stream, cache_salt=cache_salt_of(body))


async def responses(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_responses(pod, doc)
    body, model = sub.body, sub.model
    await before_engine(pod)
    req, = submit_all(pod, request, sub)
    rid = f"resp_{req.rid}"
    item_id = f"msg_{req.rid}"
    created = int(time.time())
    reported_max = sub.max_tokens[0] if sub.explicit else None
    if not sub.stream:
        await run_to_end(pod, [req])
        return json_response(_response(rid, created, model, body, req, reported_max, item_id))

    w = await SseWriter(pod, request).open()
    seq = 0

    def ev(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        doc = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return sse_event(kind, doc)

    start_doc = _response(rid, created, model, body, None, reported_max, item_id)
    await w.write(ev("response.created", response=start_doc) + ev("response.in_progress", response=start_doc)
                  + ev("response.output_item.added", output_index=0, item=_message(item_id, None))
                  + ev("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
    texts = req.output_text
    head = f'"item_id":"{item_id}","output_index":0,"content_index":0,"delta":'
    async for _, start, end in stream_many([req]):
        parts = []
        for k in range(start, end):
            parts.append(f'event: response.output_text.delta\ndata: {{"type":"response.output_text.delta",'
                         f'"sequence_number":{seq},{head}{json.dumps(texts[k])},"logprobs":[]}}\n\n')
            seq += 1
        await w.write("".join(parts).encode(), token_events=end - start)
    text = "".join(texts[:req.num_output])
    final = _response(rid, created, model, body, req, reported_max, item_id)
    await w.write(ev("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text,
                     logprobs=[])
                  + ev("response.content_part.done", item_id=item_id, output_index=0, content_index=0,
                       part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
                  + ev("response.output_item.done", output_index=0, item=_message(item_id, text))
                  + ev("response.completed", response=final))
    return await w.close()
