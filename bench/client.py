"""The load generator: one asyncio process, one pooled aiohttp session, requests sent open-loop at their
scheduled times. Every API the pods speak is read the way a client reads it (SSE for streams), recording
TTFT (first content token), end-to-end time, token usage and how the request failed, if it did."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import aiohttp

API_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "generate": "/inference/v1/generate",
    "embeddings": "/v1/embeddings",
}
_HEADERS = {"content-type": "application/json"}
_ANTHROPIC_HEADERS = {**_HEADERS, "anthropic-version": "2023-06-01"}


@dataclass(slots=True)
class Planned:
    """One request of a workload. ``body`` is pre-serialised JSON where the workload allows it."""

    i: int
    t: float  # scheduled arrival, seconds from the start of the run
    api: str
    body: bytes
    stream: bool = True
    tag: str = ""  # prefix group, session, ... (for the raw data)
    keep_text: bool = False  # collect the answer text (multi-turn needs it for the next turn)


@dataclass(slots=True)
class Result:
    i: int
    api: str
    tag: str
    t_sched: float  # scheduled arrival (s from run start)
    t_send: float  # when it was actually sent (s from run start)
    status: int = 0
    ttft: float | None = None  # s, first content token (streams only)
    e2e: float | None = None  # s, send -> last byte
    out_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    served_by: str = ""
    error: str = ""
    shed: bool = False
    decision: str = ""  # EPP's x-epp-decision header, when EPP runs with --explain-decisions
    sent_at: float = 0.0  # time.monotonic() at send: the clock the pods time requests on (sim Pod.timings)
    text: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return not self.error and not self.shed and 200 <= self.status < 300

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("text")
        return d


class Workload(Protocol):
    name: str
    arrivals: list[float]

    async def request(self, k: int) -> Planned:
        """The k-th request; may wait (a chat session's next turn waits for the previous answer)."""
        ...

    def completed(self, planned: Planned, result: Result) -> None: ...


# -- reading one response ---------------------------------------------------------------------------------
def _is_token(api: str, obj: dict[str, Any]) -> bool:
    if api in ("chat", "completions", "generate"):
        ch = obj.get("choices")
        if not ch:
            return False
        c = ch[0]
        if api == "chat":
            return bool((c.get("delta") or {}).get("content"))
        return bool(c.get("text") if api == "completions" else c.get("token_ids"))
    if api == "responses":
        return obj.get("type") == "response.output_text.delta"
    if api == "messages":
        return obj.get("type") == "content_block_delta"
    return False


def _token_text(api: str, obj: dict[str, Any]) -> str:
    if api == "chat":
        return obj["choices"][0]["delta"].get("content") or ""
    if api == "completions":
        return obj["choices"][0].get("text") or ""
    if api == "responses":
        return obj.get("delta") or ""
    if api == "messages":
        return (obj.get("delta") or {}).get("text") or ""
    return ""


def _usage(api: str, obj: dict[str, Any], res: Result) -> bool:
    """Fold usage from a stream event into ``res``; True when the event ends the stream."""
    if api in ("chat", "completions", "generate"):
        u = obj.get("usage")
        if u and not obj.get("choices"):
            res.prompt_tokens = u.get("prompt_tokens") or 0
            res.out_tokens = u.get("completion_tokens") or res.out_tokens
            res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return False
    t = obj.get("type")
    if api == "responses" and t == "response.completed":
        u = (obj.get("response") or {}).get("usage") or {}
        res.prompt_tokens = u.get("input_tokens") or 0
        res.out_tokens = u.get("output_tokens") or res.out_tokens
        res.cached_tokens = (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
        return True
    if api == "messages":
        if t == "message_start":
            u = (obj.get("message") or {}).get("usage") or {}
            res.cached_tokens = u.get("cache_read_input_tokens") or 0
            res.prompt_tokens = (u.get("input_tokens") or 0) + res.cached_tokens
        elif t == "message_delta":
            res.out_tokens = (obj.get("usage") or {}).get("output_tokens") or res.out_tokens
        return t == "message_stop"
    return False


async def _read_stream(resp: aiohttp.ClientResponse, p: Planned, res: Result, t0: float) -> None:
    api = p.api
    counted = 0
    done = False
    parts: list[str] = []
    async for raw in resp.content:
        if not raw.startswith(b"data:"):
            continue
        data = raw[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            res.error = "bad SSE data"
            return
        if ("error" in obj and api != "messages") or obj.get("type") == "error":
            res.error = f"in-band error: {str(obj.get('error'))[:120]}"
            return
        if _is_token(api, obj):
            if res.ttft is None:
                res.ttft = time.perf_counter() - t0
            counted += 1
            if p.keep_text:
                parts.append(_token_text(api, obj))
        elif _usage(api, obj, res):
            done = True
            break
    if not done:
        res.error = "stream ended early"
    if not res.out_tokens:
        res.out_tokens = counted
    if p.keep_text:
        res.text = "".join(parts)


BENCH_ID_HEADER = "x-bench-id"  # the simulated pods time requests that carry it (GET /sim/timings)


async def send(http: aiohttp.ClientSession, base_url: str, p: Planned, run_start: float,
               timeout: float = 300.0) -> Result:
    """Send one request and read the whole answer. Never raises (failures are in ``error``)."""
    t0 = time.perf_counter()
    res = Result(p.i, p.api, p.tag, p.t, t0 - run_start, sent_at=time.monotonic())
    # x-request-id too: sglang-router forwards only that one of the two
    headers = {**(_ANTHROPIC_HEADERS if p.api == "messages" else _HEADERS), BENCH_ID_HEADER: str(p.i),
               "x-request-id": f"bench-{p.i}"}
    try:
        async with http.post(base_url + API_PATHS[p.api], data=p.body, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            res.status = resp.status
            res.served_by = resp.headers.get("x-served-by", "")
            res.decision = resp.headers.get("x-epp-decision", "")
            if resp.status >= 300:
                body = await resp.read()
                # Shed = refused for load by the router/gateway itself, not an answer from a pod.
                res.shed = resp.status in (429, 503) and not res.served_by
                if not res.shed:
                    res.error = f"HTTP {resp.status}: {body[:120].decode(errors='replace')}"
            elif p.stream:
                await _read_stream(resp, p, res, t0)
            else:
                obj = json.loads(await resp.read())
                u = obj.get("usage") or {}
                res.prompt_tokens = u.get("prompt_tokens") or u.get("input_tokens") or 0
                res.out_tokens = u.get("completion_tokens") or u.get("output_tokens") or 0
                res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    except asyncio.CancelledError:
        res.error = "cancelled at the end of the run"
    except TimeoutError:
        res.error = f"timeout after {timeout:.0f}s"
    except (aiohttp.ClientError, ValueError, OSError) as e:
        res.error = f"{type(e).__name__}: {str(e)[:120]}"
    res.e2e = time.perf_counter() - t0
    return res


def new_session(limit: int = 0) -> aiohttp.ClientSession:
    """Pooled keep-alive connections, no per-request overheads we do not need."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, ttl_dns_cache=None),
                                 auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))


# -- open loop --------------------------------------------------------------------------------------------
@dataclass
class RunOutput:
    results: list[Result]
    start: float  # perf_counter at t=0
    send_lag_p99: float  # how late the generator itself sent requests (s): a check on the load generator
    wall: float


async def run_open_loop(http: aiohttp.ClientSession, base_url: str, workload: Workload, drain_s: float = 60.0,
                        at: list[tuple[float, Callable[[], Awaitable[None]]]] | None = None,
                        timeout: float = 300.0) -> RunOutput:
    """Send ``workload.arrivals`` open-loop (each at its time, whatever the answers), then wait up to
    ``drain_s`` for the stragglers. ``at``: callbacks to run at given offsets (counter snapshots)."""
    gc.collect()
    gc.freeze()  # what is built so far (workload, tokenizer) out of full collections: they would delay sends
    start = time.perf_counter() + 0.05
    lags: list[float] = []

    async def one(k: int) -> Result:
        p = await workload.request(k)
        r = await send(http, base_url, p, start, timeout)
        workload.completed(p, r)
        return r

    async def timed(offset: float, fn: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        await fn()

    side = [asyncio.create_task(timed(o, fn)) for o, fn in (at or [])]
    tasks: list[asyncio.Task[Result]] = []
    for k, t in enumerate(workload.arrivals):
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - start - t)
        tasks.append(asyncio.create_task(one(k)))
    _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for t in side:
        if not t.done():
            await t
    out: list[Result] = []
    for k, r in enumerate(results):
        if isinstance(r, Result):
            out.append(r)
        else:  # cancelled before it was even sent (a session never became free)
            out.append(Result(k, "?", "", workload.arrivals[k], -1.0, error="cancelled before sending"))
    lags.sort()
    lag99 = lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0
    return RunOutput(out, start, lag99, time.perf_counter() - start)
