"""Pooling APIs: embeddings, score, rerank, classify. Each input runs through the engine as a prefill-only
request (it takes KV blocks and scheduler time like any prompt, and produces no tokens)."""

from __future__ import annotations

import base64
import math
import random
import struct
import time
from typing import Any

from aiohttp import web

from epp_sim.apis.base import (
    Pod,
    Submission,
    before_engine,
    check_length,
    json_response,
    require_object,
    resolve_model,
    run_to_end,
    submit_all,
    token_ids_of,
)
from epp_sim.engine import SimRequest
from epp_sim.errors import ApiError

_MAX_INPUTS = 2048
_SEP = "\n\n"


def _inputs(pod: Pod, value: Any, param: str) -> list[list[int]]:
    if isinstance(value, str):
        return [pod.tokenizer.encode(value) or [0]]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [token_ids_of(pod, value, param)]
        if len(value) > _MAX_INPUTS:
            raise ApiError(400, f"{param}: at most {_MAX_INPUTS} inputs", param=param)
        out = []
        for v in value:
            if isinstance(v, str):
                out.append(pod.tokenizer.encode(v) or [0])
            elif isinstance(v, list):
                out.append(token_ids_of(pod, v, param))
            else:
                raise ApiError(400, f"{param}: inputs must be strings or token id lists", param=param)
        return out
    raise ApiError(400, f"{param}: must be a string or a non-empty list", param=param)


def _submission(pod: Pod, body: dict[str, Any], model: str, lora: str | None, prompts: list[list[int]],
                usage: bool = True, **options: Any) -> Submission:
    """Prefill-only work; the usage reports prompt tokens, none of them cached."""
    for p in prompts:
        check_length(pod, len(p), 0, False)
    return Submission(body=body, model=model, lora=lora, prompts=prompts, max_tokens=[0] * len(prompts),
                      explicit=False, prefill_only=True, usage=usage, cached=False, options=options)


async def _run(pod: Pod, request: web.Request, sub: Submission) -> list[SimRequest]:
    await before_engine(pod)
    reqs = submit_all(pod, request, sub)
    await run_to_end(pod, reqs)
    return reqs


def _usage(reqs: list[SimRequest]) -> dict[str, Any]:
    n = sum(r.num_prompt for r in reqs)
    return {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0, "prompt_tokens_details": None}


def _vector(ids: list[int], dim: int) -> list[float]:
    rng = random.Random(hash(tuple(ids[:4096])) ^ len(ids))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _similarity(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 0.0


def _input_prompts(pod: Pod, doc: Any) -> tuple[dict[str, Any], str, str | None, list[list[int]]]:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    if "input" not in body:
        raise ApiError(400, "input: Field required", param="input")
    return body, model, lora, _inputs(pod, body["input"], "input")


def parse_embeddings(pod: Pod, doc: Any) -> Submission:
    body, model, lora, prompts = _input_prompts(pod, doc)
    dim = body.get("dimensions") or pod.rc.base.embedding_dim
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= 65536:
        raise ApiError(400, "dimensions: must be a positive integer", param="dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format: must be 'float' or 'base64'", param="encoding_format")
    return _submission(pod, body, model, lora, prompts, dimensions=dim, encoding_format=fmt)


async def embeddings(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_embeddings(pod, doc)
    model, prompts, dim, fmt = sub.model, sub.prompts, sub.options["dimensions"], sub.options["encoding_format"]
    reqs = await _run(pod, request, sub)
    data = []
    for i, p in enumerate(prompts):
        vec: Any = _vector(p, dim)
        if fmt == "base64":
            vec = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
        data.append({"index": i, "object": "embedding", "embedding": vec})
    return json_response({"id": f"embd-{reqs[0].rid}", "object": "list", "created": int(time.time()),
                          "model": model, "data": data, "usage": _usage(reqs)})


def _texts(value: Any, param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        out = []
        for v in value:
            if isinstance(v, dict) and isinstance(v.get("text"), str):
                out.append(v["text"])
            elif isinstance(v, str):
                out.append(v)
            else:
                raise ApiError(400, f"{param}: items must be strings", param=param)
        return out
    raise ApiError(400, f"{param}: must be a string or a non-empty list of strings", param=param)


def parse_score(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    left_key = next((k for k in ("text_1", "queries", "query") if k in body), None)
    right_key = next((k for k in ("text_2", "documents", "items") if k in body), None)
    if left_key is None or right_key is None:
        raise ApiError(400, "text_1 and text_2 are required", param="text_1")
    left, right = _texts(body[left_key], left_key), _texts(body[right_key], right_key)
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise ApiError(400, "text_1 and text_2 must have the same length, or text_1 a single item",
                       param=left_key)
    tok = pod.tokenizer
    pairs = [(tok.encode(a), tok.encode(b)) for a, b in zip(left, right, strict=True)]
    return _submission(pod, body, model, lora, [a + tok.encode(_SEP) + b or [0] for a, b in pairs], pairs=pairs)


async def score(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_score(pod, doc)
    model, pairs = sub.model, sub.options["pairs"]
    reqs = await _run(pod, request, sub)
    data = [{"index": i, "object": "score", "score": _similarity(a, b)} for i, (a, b) in enumerate(pairs)]
    return json_response({"id": f"score-{reqs[0].rid}", "object": "list", "created": int(time.time()),
                          "model": model, "data": data, "usage": _usage(reqs)})


def parse_rerank(pod: Pod, doc: Any) -> Submission:
    body = require_object(doc)
    model, lora = resolve_model(pod, body)
    query = body.get("query")
    if not isinstance(query, str):
        raise ApiError(400, "query: Field required (a string)", param="query")
    docs = _texts(body.get("documents"), "documents")
    top_n = body.get("top_n") or len(docs)
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
        raise ApiError(400, "top_n: must be a positive integer", param="top_n")
    tok = pod.tokenizer
    q = tok.encode(query)
    encoded = [tok.encode(d) for d in docs]
    return _submission(pod, body, model, lora, [q + tok.encode(_SEP) + d or [0] for d in encoded],
                       usage=False, query=q, documents=docs, encoded=encoded, top_n=top_n)  # usage: total_tokens only


async def rerank(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_rerank(pod, doc)
    model, q, docs, encoded, top_n = (sub.model, sub.options["query"], sub.options["documents"],
                                      sub.options["encoded"], sub.options["top_n"])
    reqs = await _run(pod, request, sub)
    results = [{"index": i, "document": {"text": docs[i]}, "relevance_score": _similarity(q, d)}
               for i, d in enumerate(encoded)]
    results.sort(key=lambda r: -r["relevance_score"])
    return json_response({"id": f"rerank-{reqs[0].rid}", "model": model,
                          "usage": {"total_tokens": sum(r.num_prompt for r in reqs)},
                          "results": results[:top_n]})


def parse_classify(pod: Pod, doc: Any) -> Submission:
    body, model, lora, prompts = _input_prompts(pod, doc)
    return _submission(pod, body, model, lora, prompts)


async def classify(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    sub = parse_classify(pod, doc)
    model, prompts = sub.model, sub.prompts
    reqs = await _run(pod, request, sub)
    data = []
    for i, p in enumerate(prompts):
        logit = (hash(tuple(p[:4096])) % 2001 - 1000) / 250.0
        p1 = 1.0 / (1.0 + math.exp(-logit))
        probs = [1.0 - p1, p1]
        data.append({"index": i, "label": "LABEL_1" if p1 >= 0.5 else "LABEL_0", "probs": probs,
                     "num_classes": 2})
    return json_response({"id": f"classify-{reqs[0].rid}", "object": "list", "created": int(time.time()),
                          "model": model, "data": data, "usage": _usage(reqs)})
