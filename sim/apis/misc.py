"""Models list, tokenizer endpoints, audio transcription and the SageMaker `/invocations` dispatcher."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from epp_sim.apis import openai, pooling
from epp_sim.apis.base import (
    BODY_KEY,
    Handler,
    Parser,
    Pod,
    Submission,
    before_engine,
    check_length,
    json_response,
    max_tokens_of,
    require_object,
    resolve_model,
    run_to_end,
    submit,
    token_ids_of,
)
from epp_sim.errors import ApiError
from epp_sim.prompts import render_chat, responses_segments

_MAX_AUDIO_TOKENS = 1500  # Whisper's encoder sees 30 s as 1500 positions


async def models(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    rc = pod.rc
    card = {"object": "model", "created": pod.created, "owned_by": "vllm",
            "max_model_len": rc.profile.max_model_len}
    data = [{"id": name, **card, "root": rc.base.model, "parent": None,
             "permission": [{"id": f"modelperm-{pod.index}-{i}", "object": "model_permission",
                             "created": pod.created, "allow_create_engine": False, "allow_sampling": True,
                             "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                             "allow_fine_tuning": False, "organization": "*", "group": None,
                             "is_blocking": False}]}
            for i, name in enumerate(rc.served_names)]
    data += [{"id": lora, **card, "root": f"/adapters/{lora}", "parent": rc.served_names[0], "permission": []}
             for lora in rc.base.lora_adapters]
    return json_response({"object": "list", "data": data})


async def tokenize(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    body = require_object(doc)
    resolve_model(pod, body)
    if "messages" in body:
        text = render_chat(body["messages"], body.get("tools"),
                           add_generation_prompt=body.get("add_generation_prompt", True) is not False)
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise ApiError(400, "prompt or messages: Field required", param="prompt")
    ids = pod.tokenizer.encode(text)
    strs = None
    if body.get("return_token_strs"):
        strs = [pod.tokenizer.decode([t]) for t in ids]
    return json_response({"count": len(ids), "max_model_len": pod.rc.profile.max_model_len, "tokens": ids,
                          "token_strs": strs})


async def detokenize(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    body = require_object(doc)
    resolve_model(pod, body)
    ids = token_ids_of(pod, body.get("tokens"), "tokens")
    return json_response({"prompt": pod.tokenizer.decode(ids)})


# -- audio -----------------------------------------------------------------------------------------------
def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[dict[str, str], bytes]]:
    """name -> (part headers, payload) from a fully read multipart/form-data body."""
    boundary = None
    for item in content_type.split(";")[1:]:
        key, _, value = item.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ApiError(400, "multipart/form-data body without a boundary")
    delim = b"--" + boundary.encode()
    out: dict[str, tuple[dict[str, str], bytes]] = {}
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ApiError(400, "malformed multipart part")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        name = None
        for item in headers.get("content-disposition", "").split(";"):
            k, _, v = item.strip().partition("=")
            if k == "name":
                name = v.strip('"')
        if name is not None:
            out[name] = (headers, payload[:-2] if payload.endswith(b"\r\n") else payload)
    return out


async def transcriptions(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    ctype = request.headers.get("Content-Type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(400, "Transcription requests must be multipart/form-data")
    parts = parse_multipart(request[BODY_KEY], ctype)
    if "file" not in parts:
        raise ApiError(400, "file: Field required", param="file")
    audio = parts["file"][1]
    fields = {k: v[1].decode("utf-8", "replace") for k, v in parts.items() if k != "file"}
    _, lora = resolve_model(pod, {"model": fields.get("model") or None})
    seconds = max(len(audio) - 44, 0) / 32000  # 16 kHz, 16-bit mono PCM WAV
    # The encoder input stands in as the prompt: deterministic ids from the audio bytes.
    n = max(1, min(_MAX_AUDIO_TOKENS, len(audio) // 1000))
    vocab = pod.tokenizer.vocab_size
    step = max(1, len(audio) // n)
    prompt = [(audio[i * step] * 257 + i) % vocab for i in range(n)] if audio else [0]
    max_tokens = check_length(pod, len(prompt), pod.rc.profile.default_max_tokens, False)
    await before_engine(pod)
    req = submit(pod, request, prompt, max_tokens, lora=lora, explicit_max=False)
    await run_to_end(pod, [req])
    text = "".join(req.output_text[:req.num_output]).strip()
    if fields.get("response_format") == "text":
        return web.Response(text=text, content_type="text/plain")
    return json_response({"text": text, "usage": {"type": "duration", "seconds": round(seconds, 3)}})


# -- SageMaker -------------------------------------------------------------------------------------------
def invocation_api(doc: Any) -> tuple[Handler, Parser]:
    """The API a SageMaker ``/invocations`` body is for (its handler and parser), by the keys it has."""
    body = require_object(doc)
    if "messages" in body:
        return openai.chat_completions, openai.parse_chat
    if "token_ids" in body and "sampling_params" in body:
        return openai.generate, openai.parse_generate
    if "prompt" in body:
        return openai.completions, openai.parse_completions
    if "input" in body:
        return pooling.embeddings, pooling.parse_embeddings
    if "query" in body and "documents" in body:
        return pooling.rerank, pooling.parse_rerank
    if "text_1" in body and "text_2" in body:
        return pooling.score, pooling.parse_score
    raise ApiError(400, "Cannot find a suitable handler for request body with keys "
                        f"{sorted(body)[:10]}")


async def invocations(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    handler, _ = invocation_api(doc)
    return await handler(pod, request, doc)


def parse_invocations(pod: Pod, doc: Any) -> Submission:
    _, parse = invocation_api(doc)
    return parse(pod, doc)


# -- vLLM's render endpoints (scale-out): the prompt token ids a request would run, without running it ------
def _generate_request(pod: Pod, model: str, prompt: list[int], body: dict[str, Any], *keys: str) -> dict[str, Any]:
    max_tokens, _ = max_tokens_of(pod, body, *keys)
    return {"request_id": f"render-{pod.engine.next_id()}", "token_ids": prompt, "features": None,
            "sampling_params": {"max_tokens": max_tokens}, "model": model, "stream": False,
            "stream_options": None, "cache_salt": body.get("cache_salt"), "priority": 0,
            "kv_transfer_params": None}


async def render_chat_request(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    """`POST /v1/chat/completions/render`: one GenerateRequest with the prompt's token ids (what routers
    such as vllm-router's kv_aware policy ask for before they choose a pod)."""
    body = require_object(doc)
    model, _ = resolve_model(pod, body)
    prompt = openai.chat_prompt(pod, body)
    return json_response(_generate_request(pod, model, prompt, body, "max_completion_tokens", "max_tokens"))


async def render_completions(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    """`POST /v1/completions/render`: a list of GenerateRequests, one per prompt."""
    body = require_object(doc)
    model, _ = resolve_model(pod, body)
    if "prompt" not in body:
        raise ApiError(400, "prompt: Field required", param="prompt")
    return json_response([_generate_request(pod, model, p, body, "max_tokens")
                          for p in openai.completion_prompts(pod, body["prompt"])])


async def render_responses(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    body = require_object(doc)
    model, _ = resolve_model(pod, body)
    if "input" not in body:
        raise ApiError(400, "input: Field required", param="input")
    prompt = pod.tokenizer.encode_segments(responses_segments(body))
    return json_response(_generate_request(pod, model, prompt, body, "max_output_tokens"))
