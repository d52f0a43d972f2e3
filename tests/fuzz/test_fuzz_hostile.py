"""Hostile values in every field the parsers read, and in the headers and path EPP keeps: whatever one client
sends, what EPP holds afterwards (metrics series, decision records, Python memory) stays bounded and the
next ordinary request is routed as before.

Each case takes a valid body of a random API and puts one hostile value (a megabyte string, a control
character, a 4,000-digit number, a deep or long array) at a random place in it, or in ``x-request-id``,
the objective/rewrite headers or the path's query string. The pod "answers" 404 or 200 at random.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from epp.observability.decisions import DEFAULT_SIZE
from tests.extproc_helpers import (
    body_msg,
    drive,
    headers_msg,
    make_director,
    new_stream,
    response_body_msg,
    response_headers_msg,
)
from tests.fuzz.counting import count
from tests.fuzz.strategies import API_BODIES, _paths_in, _set_path
from tests.unit.test_observability import full_request, observed

hostile_values = st.one_of(
    st.integers(1 << 16, 1 << 20).map(lambda n: "m" * n),  # up to a megabyte
    st.text(min_size=1, max_size=40).map(lambda s: s + "\n\x1b[31m\r\x00" + s),
    st.integers(3000, 4000).map(lambda n: int("9" * n)),
    st.sampled_from([2**63, -(2**63), 1e308, -1e308, 2**31, 2**31 - 1]),
    st.integers(100, 2000).map(lambda n: [[]] * n),
    st.integers(50, 60).map(lambda depth: json.loads("[" * depth + "1" + "]" * depth)),
)

# One shared director for the whole run: what a long-lived EPP keeps across hostile clients.
DIRECTOR, METRICS = observed(make_director([("p1", 0, 0.1), ("p2", 0, 0.1)]))
STATE: dict[str, Any] = {}


def _hostile_doc(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from([p for p in sorted(API_BODIES) if p.startswith(("/v1/", "/inference"))]))
    doc = draw(API_BODIES[path])
    places = _paths_in(doc) or [["model"]]
    where = draw(st.sampled_from([*places, ["model"], ["max_tokens"]]))
    return path, _set_path(doc, where, draw(hostile_values))


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], int]:
    path, doc = _hostile_doc(draw)
    headers: dict[str, str] = {}
    spot = draw(st.sampled_from(["body", "request-id", "objective", "rewrite", "query"]))
    big = "h" * draw(st.integers(1000, 40_000)) + "\n"
    if spot == "request-id":
        headers["x-request-id"] = big
    elif spot == "objective":
        headers["x-gateway-inference-objective"] = big
    elif spot == "rewrite":
        headers["x-gateway-model-name-rewrite"] = big
    elif spot == "query":
        path += "?api_key=sk-secret&pad=" + "q" * 5000
    try:
        body = json.dumps(doc).encode()
    except ValueError:  # a value json cannot encode (a very large int): the raw digits instead
        body = json.dumps({**doc, "max_tokens": 1}).replace('"max_tokens": 1', '"max_tokens": ' + "9" * 4000).encode()
    return path, body, headers, draw(st.sampled_from([200, 404]))


def _retained() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@given(hostile_requests())
def test_hostile_values_leave_epp_bounded(case):
    count("hostile values")
    import asyncio

    path, body, headers, status = case
    if not tracemalloc.is_tracing():
        tracemalloc.start()
        STATE["baseline"] = _retained()
        STATE["cases"] = 0

    async def one() -> None:
        stream = new_stream(DIRECTOR)
        hdrs = {":path": path, **headers}
        out = await drive(stream, [headers_msg(headers=hdrs), body_msg(body)])
        if stream.decision is not None:
            await drive(stream, [response_headers_msg(status), response_body_msg(b'{"usage":{}}', eos=True)])
        assert out
        stream.close()

    asyncio.run(one())
    STATE["cases"] += 1
    page = generate_latest(METRICS.registry)
    assert len(page) < 2 << 20, len(page)
    records = json.dumps(list(DIRECTOR.hooks.decisions.records), default=str)
    assert len(records) < DEFAULT_SIZE * 4096, len(records)  # ~1-2 KB per record, whatever the client sent
    assert "secret" not in records
    assert all(e.inflight_requests == 0 for e in DIRECTOR.pool.endpoints)
    # what stays after the request: no more than a few MB, however many megabyte values went through
    assert _retained() - STATE["baseline"] < 24 << 20, (_retained() - STATE["baseline"], STATE["cases"])


def test_ordinary_requests_still_route_after_the_hostile_ones():
    import asyncio

    async def ordinary() -> None:
        _out, _resp, stream = await full_request(DIRECTOR)
        assert stream.decision is not None and stream.request.model == "my-model"

    asyncio.run(ordinary())
    if tracemalloc.is_tracing():
        tracemalloc.stop()
