"""What every API handler shares: the pod context, request parsing, engine calls, SSE writing."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from epp_sim.config import ResolvedConfig
from epp_sim.engine import Engine, SimRequest
from epp_sim.errors import ApiError, model_not_found
from epp_sim.faults import Faults
from epp_sim.metrics import PodMetrics
from epp_sim.sleep import SleepMode
from epp_sim.tokenizer import Tokenizer


def _request_key(name: str, kind: type) -> Any:
    maker = getattr(web, "RequestKey", None)  # aiohttp >= 3.12; plain strings before
    return maker(name, kind) if maker is not None else name


BODY_KEY = _request_key("sim_body", bytes)
STREAM_KEY = _request_key("sim_stream", web.StreamResponse)
REQS_KEY = _request_key("sim_reqs", list)

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


class StreamCut(Exception):
    """Raised after a fault cut a stream's connection on purpose."""


@dataclass
class Pod:
    """Everything one simulated pod owns."""

    index: int
    host: str
    port: int
    rc: ResolvedConfig
    engine: Engine
    tokenizer: Tokenizer
    metrics: PodMetrics
    faults: Faults = field(default_factory=Faults)
    sleep: SleepMode = field(default_factory=SleepMode)
    created: int = field(default_factory=lambda: int(time.time()))
    rng: random.Random = field(default_factory=random.Random)
    role: str = "both"  # llm-d.ai/role: prefill | decode | both (sim/pd.py)
    client: Any = None  # aiohttp.ClientSession of the P/D sidecar, opened on first use
    # (x-bench-id, request received, first token) on the monotonic clock of every process on the host, for requests
    # that carry the header: the benchmarks split a client's TTFT into the path to the pod, the pod's own
    # time and the path back (GET /sim/timings)
    timings: deque[tuple[str, float, float | None]] = field(default_factory=lambda: deque(maxlen=1 << 17))

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Handler = Callable[[Pod, web.Request, Any], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class Submission:
    """A request parsed into engine work: what its handler submits (one engine request per prompt), and what
    the answer tells the client. Each API's ``parse_*`` function makes it, for the pod's HTTP handler and for
    the simulator without HTTP (sim/offline.py) alike; an empty one (no prompts) needs no engine."""

    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # the name the response reports
    lora: str | None = None
    prompts: list[list[int]] = field(default_factory=list)
    max_tokens: list[int] = field(default_factory=list)  # one per prompt, within max_model_len
    explicit: bool = True  # the client set max_tokens (finish reason "length", not "stop")
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    continuous: bool = False  # stream_options.continuous_usage_stats
    cache_salt: str | None = None
    prefill_only: bool = False  # pooling: the prompt's prefill is the whole work
    usage: bool = True  # the response reports token usage (a stream only with include_usage)
    cached: bool = True  # ... including the cached prompt tokens
    options: dict[str, Any] = field(default_factory=dict)  # what else the handler answers with (per API)


Parser = Callable[[Pod, Any], Submission]


# -- parsing ---------------------------------------------------------------------------------------------
def parse_json(request: web.Request) -> Any:
    ctype = request.headers.get("Content-Type")
    if ctype and not ctype.split(";", 1)[0].strip().lower().endswith("json"):
        raise ApiError(415, "Unsupported Media Type: Only 'application/json' is allowed")
    body: bytes = request[BODY_KEY]
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from None
    return doc


def require_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ApiError(400, "Input should be a valid dictionary or object to extract fields from")
    return doc


def resolve_model(pod: Pod, body: dict[str, Any], required: bool = False) -> tuple[str, str | None]:
    """(model name to report, LoRA adapter or None). vLLM defaults a missing model to the first name."""
    model = body.get("model")
    if model is None or model == "":
        if required:
            raise ApiError(400, "model: Field required", param="model")
        return pod.rc.served_names[0], None
    if not isinstance(model, str):
        raise ApiError(400, "model: Input should be a valid string", param="model")
    if model in pod.rc.served_names:
        return model, None
    if model in pod.rc.base.lora_adapters:
        return model, model
    raise model_not_found(model)


def max_tokens_of(pod: Pod, body: dict[str, Any], *keys: str) -> tuple[int, bool]:
    """(max output tokens, whether the client set it)."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ApiError(400, f"{key}: Input should be a valid integer", param=key)
        if value < 1:
            raise ApiError(400, f"{key} must be at least 1, got {value}.", param=key)
        return value, True
    return pod.rc.profile.default_max_tokens, False


def check_length(pod: Pod, num_prompt: int, max_tokens: int, explicit: bool) -> int:
    """Reject what cannot fit max_model_len; returns the max_tokens to use."""
    limit = pod.rc.profile.max_model_len
    if num_prompt >= limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your request "
                            f"has {num_prompt} input tokens. Please reduce the length of the input messages.",
                       param="messages")
    if num_prompt + max_tokens > limit:
        if explicit:
            raise ApiError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
                                f"model's maximum context length is {limit} tokens and your request has "
                                f"{num_prompt} input tokens ({max_tokens} > {limit} - {num_prompt}).",
                           param="max_tokens")
        max_tokens = limit - num_prompt
    return max_tokens


def token_ids_of(pod: Pod, value: Any, param: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{param}: must be a non-empty list of token ids", param=param)
    vocab = pod.tokenizer.vocab_size
    for t in value:
        if not isinstance(t, int) or isinstance(t, bool):
            raise ApiError(400, f"{param}: token ids must be integers", param=param)
        if not 0 <= t < vocab:
            raise ApiError(400, f"Token id {t} is out of vocabulary", param=param)
    return value


def cache_salt_of(body: dict[str, Any]) -> str | None:
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise ApiError(400, "cache_salt: must be a non-empty string", param="cache_salt")
    return salt


def stream_flag(body: dict[str, Any]) -> bool:
    """``stream``: a boolean; null or absent is False."""
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
    return stream


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous_usage_stats)."""
    stream = stream_flag(body)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False, False
    if not isinstance(opts, dict):
        raise ApiError(400, "stream_options: Input should be a valid dictionary", param="stream_options")
    if not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    include = opts.get("include_usage", True)
    continuous = opts.get("continuous_usage_stats", False)
    return True, bool(include), bool(continuous)


# -- usage -----------------------------------------------------------------------------------------------
def openai_usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def req_usage(reqs: list[SimRequest]) -> dict[str, Any]:
    return openai_usage(sum(r.num_prompt for r in reqs), sum(r.num_output for r in reqs),
                        sum(r.cached_tokens or 0 for r in reqs))


# -- engine calls ----------------------------------------------------------------------------------------
def submit(pod: Pod, request: web.Request, prompt: list[int], max_tokens: int, **kw: Any) -> SimRequest:
    """Hand a request to the engine; the server middleware aborts it if the handler ends early."""
    req = pod.engine.submit(prompt, max_tokens, **kw)
    request.setdefault(REQS_KEY, []).append(req)
    return req


def submit_all(pod: Pod, request: web.Request, sub: Submission) -> list[SimRequest]:
    """One engine request per prompt of ``sub``."""
    if sub.prefill_only:
        return [submit(pod, request, p, 0, prefill_only=True, lora=sub.lora) for p in sub.prompts]
    return [submit(pod, request, p, m, stream=sub.stream, lora=sub.lora, cache_salt=sub.cache_salt,
                   explicit_max=sub.explicit) for p, m in zip(sub.prompts, sub.max_tokens, strict=True)]


async def before_engine(pod: Pod) -> None:
    if pod.faults.delay_ms > 0:
        await asyncio.sleep(pod.faults.delay_ms / 1000)


async def run_to_end(pod: Pod, reqs: list[SimRequest]) -> None:
    """Wait until every request finished; abort them if the client goes away."""
    try:
        for r in reqs:
            while not r.finished:
                await r.wait(r.max_tokens)
            _check_not_aborted(r)
    finally:
        for r in reqs:
            if not r.finished:
                pod.engine.abort(r)


def _check_not_aborted(req: SimRequest) -> None:
    if req.finish_reason == "abort":  # only the engine's own shutdown aborts a request a client still reads
        raise ApiError(503, "Request aborted: the engine is shutting down")


async def stream_many(reqs: list[SimRequest]) -> AsyncIterator[tuple[int, int, int]]:
    """Interleave several requests' token ranges as (index, start, end), in arrival order."""
    if len(reqs) == 1:
        r = reqs[0]
        seen = 0
        while True:
            n = await r.wait(seen)
            if n > seen:
                yield 0, seen, n
                seen = n
            if r.finished:
                _check_not_aborted(r)
                return
    queue: asyncio.Queue[tuple[int, int, int] | None] = asyncio.Queue()

    async def pump(i: int, r: SimRequest) -> None:
        seen = 0
        while True:
            n = await r.wait(seen)
            if n > seen:
                queue.put_nowait((i, seen, n))
                seen = n
            if r.finished:
                queue.put_nowait(None if r.finish_reason != "abort" else (-1, 0, 0))
                return

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(reqs)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif item[0] < 0:
                raise ApiError(503, "Request aborted: the engine is shutting down")
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


# -- responses -------------------------------------------------------------------------------------------
def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


class SseWriter:
    """Writes SSE events as soon as they exist (each write goes straight to the socket)."""

    def __init__(self, pod: Pod, request: web.Request) -> None:
        self.pod = pod
        self.request = request
        self.resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.token_events = 0
        self._cut_after = pod.faults.abort_after_tokens

    async def open(self) -> SseWriter:
        self.request[STREAM_KEY] = self.resp
        await self.resp.prepare(self.request)
        return self

    async def write(self, data: bytes, token_events: int = 0) -> None:
        cut = self._cut_after
        if cut is not None and self.token_events + token_events > cut:
            # The fault: drop the connection mid-stream, no terminating chunk, no [DONE].
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            raise StreamCut()
        self.token_events += token_events
        await self.resp.write(data)

    async def close(self) -> web.StreamResponse:
        delay = self.pod.faults.eof_delay_ms
        if delay:
            await asyncio.sleep(delay / 1000)
        await self.resp.write_eof()
        return self.resp


def sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def sse_event(event: str, doc: Any) -> bytes:
    return f"event: {event}\ndata: ".encode() + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
