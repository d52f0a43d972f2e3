"""Streams stay streams through Envoy + EPP, and nothing is lost under concurrency."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx

from epp.stack.tour import MODEL


def test_sse_chunks_reach_the_client_as_they_are_produced(stack):
    """With response bodies flowing through EPP, each event must arrive when the pod sends it,
    not all at the end: the arrival times must spread over the generation time."""
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    arrivals = []
    with httpx.Client(base_url=stack.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        t0 = time.perf_counter()
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) >= 100
    gaps = sorted(b - a for a, b in itertools.pairwise(arrivals))
    spread = arrivals[-1] - arrivals[0]
    # The pod makes one token per 5 ms step: 100 tokens take about 0.5 s. Buffering anywhere on the
    # path would deliver them in a burst at the end.
    assert spread > 0.3, f"all events arrived within {spread:.3f}s: buffered, not streamed"
    assert gaps[len(gaps) // 2] > 0.002, f"median gap between events {gaps[len(gaps) // 2] * 1000:.2f} ms"


async def _one_stream(client: httpx.AsyncClient, i: int) -> tuple[int, str, str, int]:
    body = {"model": MODEL, "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"request {i}"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line async for line in r.aiter_lines() if line.startswith("data:")]
        usage = json.loads(events[-2][5:])["usage"]["completion_tokens"] if len(events) >= 2 else 0
        return r.status_code, r.headers.get("x-served-by", ""), events[-1] if events else "", usage


def test_200_concurrent_streams_all_answered(stack):
    async def run() -> list:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=stack.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_one_stream(client, i) for i in range(200)), return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(status == 200 and last.strip() == "data: [DONE]" and usage == 12 for status, _, last, usage in results)
    assert len({served for _, served, _, _ in results}) == 3  # spread over the pool
