"""Hostile clients through the real Envoy: one client must not degrade routing for everyone else.

Each case was a reproduced finding: a 1 MB model name swelling /metrics, a 4,000-digit ``max_tokens`` making
other clients' requests fail, a client-chosen model rewrite, API keys in query strings kept in
``/debug/decisions``.
"""

from __future__ import annotations

import json
import random
import re
import string
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from epp.stack.tour import MODEL

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c


def metrics_page(stack) -> str:
    return httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=30).text


def test_huge_model_names_are_refused_and_metrics_stay_small(stack, client):
    r = client.post("/v1/chat/completions", json={**CHAT, "model": "m" * (1 << 20)})
    assert r.status_code == 400 and r.headers["x-epp-error-reason"] == "model-name-too-long"
    assert r.json()["error"]["param"] == "model"
    r = client.post("/v1/messages", json={**CHAT, "model": "m" * (1 << 20)})
    assert r.status_code == 400 and r.json()["type"] == "error"  # Anthropic's envelope
    rng = random.Random(7)
    for i in range(200):  # distinct names: half too long (refused by EPP), half unknown to the pods (404)
        length = 2000 if i % 2 else 200
        name = f"{i}-" + "".join(rng.choices(string.ascii_letters, k=length))
        r = client.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert r.status_code in (400, 404), r.text[:200]
    page = metrics_page(stack)
    assert len(page) < 2 << 20, len(page)
    assert not re.search(r'model_name="\d+-', page)  # names no pod serves left no series behind
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert f'model_name="{MODEL}"' in metrics_page(stack)  # the real model keeps its own label


def test_absurd_max_tokens_beside_ordinary_requests(client):
    huge = json.dumps({**CHAT, "max_tokens": 0}).replace('"max_tokens": 0', '"max_tokens": ' + "9" * 4000)

    def hostile(_: int) -> int:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            return c.post("/v1/chat/completions", content=huge, headers={"content-type": "application/json"}
                          ).status_code

    def ordinary(_: int) -> int:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            return c.post("/v1/chat/completions", json=CHAT).status_code

    big = json.dumps({**CHAT, "max_tokens": 2**31 - 1})  # the largest accepted: clamped in EPP's estimates

    def large(_: int) -> int:
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            return c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}
                          ).status_code

    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(hostile, i) for i in range(30)] + [pool.submit(large, i) for i in range(10)]
        good = list(pool.map(ordinary, range(40)))
    assert good == [200] * 40
    assert {f.result() for f in bad[:30]} == {400}
    assert all(f.result() in (200, 400) for f in bad[30:])  # the pod's own call on a huge max_tokens


def test_client_sent_model_rewrite_does_not_reach_the_pod(client):
    r = client.post("/v1/chat/completions", json=CHAT,
                    headers={"x-gateway-model-name-rewrite": "someone-elses-model",
                             "x-llm-d-model-name-rewrite": "someone-elses-model"})
    # honoured, the pod would have been asked for a model it does not serve (404)
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_decision_records_keep_no_query_strings(stack, client):
    r = client.post("/v1/chat/completions?api_key=sk-secret-123&x=1", json=CHAT)
    assert r.status_code in (200, 404)
    decisions = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/debug/decisions", timeout=30).text
    assert "/v1/chat/completions" in decisions and "secret" not in decisions


def test_errors_epp_answers_carry_the_request_id(client):
    r = client.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["x-epp-error-reason"] == "empty-body"
    assert r.json()["requestId"] == r.headers["x-request-id"]
    r = client.post("/v1/messages", json={**CHAT, "model": "m" * 300}, headers={"x-request-id": "client-id-1"})
    assert r.status_code == 400 and r.json()["request_id"] == "client-id-1"
