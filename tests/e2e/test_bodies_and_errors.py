"""Bodies arrive intact; bad input gets the documented status and envelope; EPP keeps serving."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from epp.stack.tour import MODEL

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def ok_after(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-served-by"], r.text


def test_five_megabyte_body_arrives_intact(stack):
    # A large field the model server ignores (a long prompt would exceed the model's context).
    body = json.dumps({"model": MODEL, "max_tokens": 2, "prompt": "hi", "metadata": {"blob": "lorem ipsum " * 436_000}}
                      ).encode()
    assert len(body) > 5_000_000
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["x-sim-body-len"] == str(len(body))
    assert r.headers["x-sim-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert r.headers["x-served-by"] == r.headers["x-epp-endpoint"]


@pytest.mark.parametrize(("path", "body", "status", "reason"), [
    ("/v1/chat/completions", b"{not json", 400, "invalid-json"),
    ("/v1/chat/completions", b"[1, 2, 3]", 400, "not-an-object"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400,
     "missing-model"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400, "invalid-field"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}).encode(), 400, "invalid-field"),
    ("/v1/completions", b"\xff\xfe{\"model\": 1}", 400, "invalid-utf8"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "json-too-deep"),
    ("/inference/v1/generate", json.dumps({"model": MODEL, "token_ids": [-1]}).encode(), 400, "invalid-field"),
])
def test_bad_openai_requests_get_400_in_the_openai_envelope(stack, path, body, status, reason):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text[:300]
        assert r.headers["x-epp-error-reason"] == reason
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and err["code"] == reason
        ok_after(c)


def test_bad_anthropic_request_gets_the_anthropic_envelope(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": []})
        assert r.status_code == 400
        doc = r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        ok_after(c)


def test_oversized_body_is_413_before_it_is_read(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        r = c.post("/v1/completions", content=b"x" * (33 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "body-too-large"
        ok_after(c)


def test_unknown_paths_are_routed_not_refused(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        for path in ("/v1/score", "/classify", "/detokenize", "/some/unknown/path"):
            r = c.post(path, json={"model": MODEL, "text_1": "a", "text_2": "b", "input": "x", "tokens": [1, 2]})
            assert r.headers.get("x-served-by"), (path, r.status_code, r.text[:200])  # a pod answered
            assert "x-epp-error-reason" not in r.headers
        ok_after(c)


def test_gateway_prefixed_path_and_query_string(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        r = c.post(f"/{MODEL}/v1/chat/completions?api-version=1", json=CHAT)
        assert r.status_code == 200 and r.headers["x-served-by"] == r.headers["x-epp-endpoint"]


def test_model_rewrite_header_is_applied_and_reversed(policy_stack):
    """The pod sees the rewritten model; the client sees its own model name back, with a valid framing. The
    rewrite header is the gateway's (a route policy of policy_stack): a client's own is stripped."""
    with httpx.Client(base_url=policy_stack.url, timeout=30) as c:
        r = c.post("/rewrite-to-model/v1/chat/completions", json={**CHAT, "model": "client-alias"},
                   headers={"x-sim-echo-request": "1"})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["model"] == "client-alias" and r.headers["x-sim-request-model"] == MODEL
        r = c.post("/rewrite-to-model/v1/chat/completions", json={**CHAT, "model": "client-alias", "stream": True})
        lines = [line[5:] for line in r.text.splitlines() if line.startswith("data:")]
        events = [json.loads(line) for line in lines if "[DONE]" not in line]
        assert events and all(e["model"] == "client-alias" for e in events)
