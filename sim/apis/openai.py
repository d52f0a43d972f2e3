"""OpenAI chat completions and completions, and vLLM's token-in/token-out `/inference/v1/generate`."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from epp_sim import pd
from epp_sim.apis.base import (
    DONE,
    Pod,
    SseWriter,
    Submission,
    before_engine,
    cache_salt_of,
    check_length,
    json_response,
    max_tokens_of,
    openai_usage,
    req_usage,
    require_object,
    resolve_model,
    run_to_end,
    sse,
    stream_flags,
    stream_many,
    submit_all,
    token_ids_of,
)
from epp_sim.engine import SimRequest
from epp_sim.errors import ApiError
from epp_sim.prompts import chat_segments

_MAX_BATCH = 256


def _usage_suffix(req: SimRequest, completion: int) -> str:
    u = openai_usage(req.num_prompt, completion, req.cached_tokens or 0)
    return ',"usage":' + json.dumps(u, separators=(",", ":"))


# -- chat ------------------------------------------------------------------------------------------------
def chat_prompt(pod: Pod, body: dict[str, Any]) -> list[int]:
    add_gen = body.get("add_generation_prompt", True)
    segments = chat_segments(body.get("messages"), body.get("tools"), add_generation_prompt=add_gen is not False)
    return pod.tokenizer.encode_segments(segments)


def _submission(pod: Pod, body: dict[str, Any], model: str, lora: str | None, flags: tuple[bool, bool, bool],
                prompts: list[list[int]], params: dict[str, Any], *max_keys: str) -> Submission:
    """The rest of an OpenAI-style request: max_tokens (from ``params``) within the context, the cache salt."""
    stream, include_usage, continuous = flags
    max_tokens, explicit = max_tokens_of(pod, params, *max_keys)
    return Submission(body=body, model=model, lora=lora, prompts=prompts,
                      max_tokens=[check_length(pod, len(p), max_tokens, explicit) for p in prompts],
                      explicit=explicit, stream=stream, include_usage=include_usage, continuous=continuous,
                      cache_salt=cache_salt_of(body), usage=include_usage or not stream)


def parse_chat(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    flags = stream_flags(body)
    return _submission(pod, body, model, lora, flags, [chat_prompt(pod, body)], body, "max_completion_tokens",
                       "max_tokens")


async def chat_completions(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_chat(pod, doc)
    body, model, lora, salt, prompt = sub.body, sub.model, sub.lora, sub.cache_salt, sub.prompts[0]
    await before_engine(pod)
    await pd.prepare(pod, request, body, prompt, lora, salt)
    req, = submit_all(pod, request, sub)
    rid = f"chatcmpl-{req.rid}"
    created = int(time.time())
    if not sub.stream:
        await run_to_end(pod, [req])
        doc = chat_completion_doc(rid, created, model, req)
        doc["kv_transfer_params"] = pd.produced(pod, body, req, prompt, lora, salt)
        return json_response(doc)
    return await _stream_chat(pod, request, rid, created, model, req, sub.include_usage, sub.continuous)


def chat_completion_doc(rid: str, created: int, model: str, req: SimRequest) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(req.output_text[:req.num_output]),
                        "refusal": None, "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning_content": None},
            "logprobs": None, "finish_reason": req.finish_reason, "stop_reason": None,
        }],
        "service_tier": None, "system_fingerprint": None,
        "usage": req_usage([req]), "prompt_logprobs": None, "kv_transfer_params": None,
    }


async def _stream_chat(pod: Pod, request: web.Request, rid: str, created: int, model: str, req: SimRequest,
                       include_usage: bool, continuous: bool) -> web.StreamResponse:
    w = await SseWriter(pod, request).open()
    head = (f'data: {{"id":"{rid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,"delta":')
    texts = req.output_text
    async for _, start, end in stream_many([req]):
        last = req.num_output - 1 if req.finished else -1
        parts = []
        if start == 0:  # like vLLM, the role chunk goes out with the first token, at TTFT
            usage0 = _usage_suffix(req, 0) if continuous else ""
            parts.append(f'{head}{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]'
                         f'{usage0}}}\n\n')
        for k in range(start, end):
            fin = f'"{req.finish_reason}"' if k == last else "null"
            usage = _usage_suffix(req, k + 1) if continuous else ""
            parts.append(f'{head}{{"content":{json.dumps(texts[k])}}},"logprobs":null,"finish_reason":{fin}}}]'
                         f'{usage}}}\n\n')
        await w.write("".join(parts).encode(), token_events=end - start)
    if include_usage:
        await w.write(sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": req_usage([req])}))
    await w.write(DONE)
    return await w.close()


# -- completions -----------------------------------------------------------------------------------------
def completion_prompts(pod: Pod, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "Prompt cannot be empty", param="prompt")
        return [pod.tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [token_ids_of(pod, prompt, "prompt")]
        if len(prompt) > _MAX_BATCH:
            raise ApiError(400, f"at most {_MAX_BATCH} prompts per request", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str) and p:
                out.append(pod.tokenizer.encode(p))
            elif isinstance(p, list):
                out.append(token_ids_of(pod, p, "prompt"))
            else:
                raise ApiError(400, "prompt: each prompt must be a non-empty string or token id list",
                               param="prompt")
        return out
    raise ApiError(400, "prompt: must be a string, a list of strings or token ids", param="prompt")


def parse_completions(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    flags = stream_flags(body)
    if "prompt" not in body:
        raise ApiError(400, "prompt: Field required", param="prompt")
    return _submission(pod, body, model, lora, flags, completion_prompts(pod, body["prompt"]), body, "max_tokens")


async def completions(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_completions(pod, doc)
    body, model, lora, salt, prompts = sub.body, sub.model, sub.lora, sub.cache_salt, sub.prompts
    include_usage, continuous = sub.include_usage, sub.continuous
    await before_engine(pod)
    if len(prompts) == 1:  # P/D for one prompt, as llm-d's sidecar
        await pd.prepare(pod, request, body, prompts[0], lora, salt)
    reqs = submit_all(pod, request, sub)
    rid = f"cmpl-{reqs[0].rid}"
    created = int(time.time())
    if not sub.stream:
        await run_to_end(pod, reqs)
        params = pd.produced(pod, body, reqs[0], prompts[0], lora, salt) if len(prompts) == 1 else None
        return json_response({
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": "".join(r.output_text[:r.num_output]), "logprobs": None,
                         "finish_reason": r.finish_reason, "stop_reason": None, "prompt_logprobs": None}
                        for i, r in enumerate(reqs)],
            "service_tier": None, "system_fingerprint": None, "usage": req_usage(reqs),
            "kv_transfer_params": params,
        })
    w = await SseWriter(pod, request).open()
    head = (f'data: {{"id":"{rid}","object":"text_completion","created":{created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":')
    async for i, start, end in stream_many(reqs):
        r = reqs[i]
        last = r.num_output - 1 if r.finished else -1
        parts = []
        for k in range(start, end):
            fin = f'"{r.finish_reason}"' if k == last else "null"
            usage = _usage_suffix(r, k + 1) if continuous else ""
            parts.append(f'{head}{i},"text":{json.dumps(r.output_text[k])},"logprobs":null,'
                         f'"finish_reason":{fin},"stop_reason":null}}]{usage}}}\n\n')
        await w.write("".join(parts).encode(), token_events=end - start)
    if include_usage:
        await w.write(sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": req_usage(reqs)}))
    await w.write(DONE)
    return await w.close()


# -- /inference/v1/generate ------------------------------------------------------------------------------
def parse_generate(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    if "token_ids" not in body:
        raise ApiError(400, "token_ids: Field required", param="token_ids")
    prompt = token_ids_of(pod, body["token_ids"], "token_ids")
    params = body.get("sampling_params")
    if not isinstance(params, dict):
        raise ApiError(400, "sampling_params: Field required (an object)", param="sampling_params")
    return _submission(pod, body, model, lora, stream_flags(body), [prompt], params, "max_tokens")


async def generate(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_generate(pod, doc)
    model, include_usage, continuous = sub.model, sub.include_usage, sub.continuous
    given_id = sub.body.get("request_id")
    await before_engine(pod)
    req, = submit_all(pod, request, sub)
    rid = given_id if isinstance(given_id, str) and given_id else f"gen-{req.rid}"
    if not sub.stream:
        await run_to_end(pod, [req])
        return json_response({
            "request_id": rid, "model": model, "created": int(time.time()),
            "choices": [{"index": 0, "logprobs": None, "finish_reason": req.finish_reason,
                         "token_ids": req.output_ids}],
            "usage": req_usage([req]), "prompt_logprobs": None, "kv_transfer_params": None,
        })
    w = await SseWriter(pod, request).open()
    head = f'data: {{"request_id":{json.dumps(rid)},"choices":[{{"index":0,"logprobs":null,"finish_reason":'
    ids = req.all_ids
    base = req.num_prompt
    async for _, start, end in stream_many([req]):
        last = req.num_output - 1 if req.finished else -1
        parts = []
        for k in range(start, end):
            fin = f'"{req.finish_reason}"' if k == last else "null"
            usage = _usage_suffix(req, k + 1) if continuous else ""
            parts.append(f'{head}{fin},"token_ids":[{ids[base + k]}]}}]{usage}}}\n\n')
        await w.write("".join(parts).encode(), token_events=end - start)
    if include_usage:
        await w.write(sse({"request_id": rid, "choices": [], "usage": req_usage([req])}))
    await w.write(DONE)
    return await w.close()
