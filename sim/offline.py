"""The simulator without HTTP, in virtual time: what ``epp replay`` (epp/replay.py) runs a trace against.

* ``VirtualTimeLoop``: an asyncio event loop whose clock jumps to the next timer whenever nothing is ready to run.
  The engine's own step loop (``Engine._loop``: plan a step, sleep its modelled duration, apply it) runs on it
  unchanged, so a step costs the CPU time of planning it, not its modelled duration.
* ``offline_pod`` and ``render``: one pod (engine, tokenizer, configuration) and the engine submissions its HTTP
  handler (sim/apis/) would make for a request: the same prompt rendering, tokenizer, ``max_tokens`` defaults
  and length checks, errors as ``ApiError``; plus what the response tells the client (streamed or not, usage).
"""

from __future__ import annotations

import random
import selectors
from asyncio import SelectorEventLoop
from dataclasses import dataclass, field
from typing import Any

from sim.apis import anthropic, openai, pooling, responses
from sim.apis.base import (
    Pod,
    cache_salt_of,
    check_length,
    max_tokens_of,
    require_object,
    resolve_model,
    stream_flags,
    token_ids_of,
)
from sim.config import ResolvedConfig
from sim.engine import Engine
from sim.errors import ApiError
from sim.metrics import PodMetrics
from sim.prompts import responses_segments
from sim.server import match_route
from sim.tokenizer import Tokenizer

_POLL_EVERY = 64  # loop iterations between polls of real file descriptors (a syscall each)


class _JumpingSelector(selectors.DefaultSelector):
    """Where the event loop would block for ``timeout`` seconds, time jumps by ``timeout`` instead. File
    descriptors (the loop's self-pipe: a thread handing work back) are polled without waiting, every
    ``_POLL_EVERY`` iterations: virtual time does not wait for threads."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.now = start
        self._calls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only another thread can wake the loop, in real time
            return super().select(None)
        self._calls += 1
        if self._calls % _POLL_EVERY == 0:
            ready = super().select(0)
            if ready:
                return ready
        if timeout > 0:
            self.now += timeout
        return []


class VirtualTimeLoop(SelectorEventLoop):
    """An event loop in virtual time, starting at ``start`` (not 0: EPP reads a timestamp of 0 as "never")."""

    def __init__(self, start: float = 1000.0) -> None:
        self._jumping = _JumpingSelector(start)
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def offline_pod(rc: ResolvedConfig, tokenizer: Tokenizer, index: int) -> Pod:
    """A pod with no server: its engine starts with ``pod.engine.start()`` in the running loop."""
    engine = Engine(rc, tokenizer, pod_index=index)
    return Pod(index=index, host="10.0.0.1", port=8000 + index, rc=rc, engine=engine, tokenizer=tokenizer,
               metrics=PodMetrics(engine), rng=random.Random(rc.base.seed * 1000 + index))


@dataclass(slots=True)
class Submission:
    """What a request asks of the engine, and how its answer reads to the client."""

    prompts: list[list[int]] = field(default_factory=list)  # one engine request each; empty: no engine work
    max_tokens: list[int] = field(default_factory=list)
    explicit: bool = True  # the client set max_tokens (finish reason "length", not "stop")
    stream: bool = False
    lora: str | None = None
    cache_salt: str | None = None
    prefill_only: bool = False  # embeddings: the prompt's prefill is the whole work
    usage: bool = True  # the response reports token usage (a stream only with include_usage)
    cached: bool = True  # ... including the cached prompt tokens


def render(pod: Pod, path: str, doc: Any) -> Submission:
    """The engine submissions of ``POST path`` with JSON body ``doc``, as the pod's handler makes them (raises
    its ``ApiError``). Routes that never reach the engine (``/tokenize``, ``/v1/models``, ...) need no work."""
    route = match_route(path.partition("?")[0])
    if route is None:
        raise ApiError(404, "Not Found")
    h = route.handler
    if h is openai.chat_completions:
        body = require_object(doc)
        _, lora = resolve_model(pod, body)
        stream, include_usage, _ = stream_flags(body)
        prompt = openai.chat_prompt(pod, body)
        n, explicit = max_tokens_of(pod, body, "max_completion_tokens", "max_tokens")
        return Submission([prompt], [check_length(pod, len(prompt), n, explicit)], explicit, stream, lora,
                          cache_salt_of(body), usage=include_usage or not stream)
    if h is openai.completions:
        body = require_object(doc)
        _, lora = resolve_model(pod, body)
        stream, include_usage, _ = stream_flags(body)
        if "prompt" not in body:
            raise ApiError(400, "prompt: Field required", param="prompt")
        prompts = openai.completion_prompts(pod, body["prompt"])
        n, explicit = max_tokens_of(pod, body, "max_tokens")
        return Submission(prompts, [check_length(pod, len(p), n, explicit) for p in prompts], explicit, stream,
                          lora, cache_salt_of(body), usage=include_usage or not stream)
    if h is openai.generate:
        body = require_object(doc)
        _, lora = resolve_model(pod, body)
        if "token_ids" not in body:
            raise ApiError(400, "token_ids: Field required", param="token_ids")
        prompt = token_ids_of(pod, body["token_ids"], "token_ids")
        params = body.get("sampling_params")
        if not isinstance(params, dict):
            raise ApiError(400, "sampling_params: Field required (an object)", param="sampling_params")
        stream, include_usage, _ = stream_flags(body)
        n, explicit = max_tokens_of(pod, params, "max_tokens")
        return Submission([prompt], [check_length(pod, len(prompt), n, explicit)], explicit, stream, lora,
                          cache_salt_of(body), usage=include_usage or not stream)
    if h is responses.responses:
        body = require_object(doc)
        _, lora = resolve_model(pod, body)
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
        if "input" not in body:
            raise ApiError(400, "input: Field required", param="input")
        prompt = pod.tokenizer.encode_segments(responses_segments(body))
        n, explicit = max_tokens_of(pod, body, "max_output_tokens")
        return Submission([prompt], [check_length(pod, len(prompt), n, explicit)], explicit, bool(stream), lora,
                          cache_salt_of(body))
    if h is anthropic.messages:
        body = require_object(doc)
        _, lora, prompt = anthropic._parse(pod, body)
        n = body.get("max_tokens")
        if n is None:
            raise ApiError(400, "max_tokens: Field required", param="max_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ApiError(400, "max_tokens: max_tokens must be positive", param="max_tokens")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
        return Submission([prompt], [check_length(pod, len(prompt), n, True)], True, bool(stream), lora)
    if h is pooling.embeddings:
        body = require_object(doc)
        _, lora = resolve_model(pod, body)
        if "input" not in body:
            raise ApiError(400, "input: Field required", param="input")
        prompts = pooling._inputs(pod, body["input"], "input")
        for p in prompts:
            check_length(pod, len(p), 0, False)
        return Submission(prompts, [0] * len(prompts), False, False, lora, prefill_only=True, cached=False)
    return Submission()
