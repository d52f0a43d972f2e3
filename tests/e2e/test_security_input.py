"""Hostile and odd input through a real Envoy: each refused with the right status and the API's envelope,
or routed untouched when it is the model server's call; EPP never crashes and keeps serving.

Content-Type policy (epp/api/parsing.py): on a known JSON API, a body that *is* a JSON object is routed
whatever Content-Type it claims (vLLM answers 415 to text/plain itself, SGLang accepts it: the router
stays transparent); a body that is not JSON and was declared as something else (multipart, text/plain,
octet-stream) or carries a Content-Encoding EPP does not decode (gzip) gets EPP's own 415
``unsupported-media-type``; a body that is not JSON and claims JSON (or nothing) gets 400.
Limits (StreamOptions): 32 MiB body (413 ``body-too-large``), JSON depth 64 (400 ``json-too-deep``),
100,000 messages (413 ``too-many-messages``), 16 Mi prompt characters and 4 Mi prompt token ids
(413 ``prompt-too-long``). Headers are bounded by Envoy (60 KiB, 100 headers: 431) before EPP sees them.
"""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from epp.stack.tour import MODEL

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def still_serving(c: httpx.Client) -> None:
    r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-served-by"] == r.headers["x-epp-endpoint"], r.text[:200]


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        yield c
        still_serving(c)


@pytest.mark.parametrize(("path", "body", "ctype", "encoding", "status", "reason"), [
    ("/v1/chat/completions", bytes(range(256)) * 8, "application/octet-stream", None, 415, "unsupported-media-type"),
    ("/v1/chat/completions", bytes(range(256)) * 8, "application/json", None, 400, "invalid-utf8"),
    ("/v1/chat/completions", bytes(range(256)) * 8, None, None, 400, "invalid-utf8"),
    ("/v1/chat/completions", b"model=x&messages=y", "application/x-www-form-urlencoded", None, 415,
     "unsupported-media-type"),
    ("/v1/completions", b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--b--\r\n',
     "multipart/form-data; boundary=b", None, 415, "unsupported-media-type"),
    ("/v1/completions", gzip.compress(json.dumps(CHAT).encode()), "application/json", "gzip", 415,
     "unsupported-media-type"),
    ("/v1/embeddings", b"hello world", "text/plain", None, 415, "unsupported-media-type"),
    ("/v1/chat/completions", b"\xef\xbb\xbf" + json.dumps(CHAT).encode(), "application/json", None, 400,
     "invalid-json"),  # a UTF-8 BOM is not JSON (RFC 8259 §8.1); vLLM refuses it too
    ("/v1/chat/completions", b'{"model": "m", "messages": [], "x": 1e999999}', "application/json", None, 400,
     "invalid-field"),
    ("/v1/completions", b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 10_000 + b"}", "application/json",
     None, 400, "invalid-json"),
])
def test_refused_with_status_and_openai_envelope(client, path, body, ctype, encoding, status, reason):
    headers = {k: v for k, v in (("content-type", ctype), ("content-encoding", encoding)) if v is not None}
    r = client.post(path, content=body, headers=headers)
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["x-epp-error-reason"] == reason
    err = r.json()["error"]
    assert err["code"] == reason and err["message"] and err["type"] == "invalid_request_error"
    assert "x-served-by" not in r.headers  # EPP answered; no pod saw it


def test_anthropic_api_gets_its_envelope_for_unsupported_media(client):
    r = client.post("/v1/messages", content=b"\x00\x01binary", headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and r.headers["x-epp-error-reason"] == "unsupported-media-type"
    doc = r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"]


def test_json_labelled_as_text_is_routed_and_the_model_server_decides(client):
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers={"content-type": "text/plain"})
    assert r.headers.get("x-served-by"), (r.status_code, r.text[:200])  # EPP routed it
    assert "x-epp-error-reason" not in r.headers
    assert r.status_code == 415  # the simulated vLLM refuses text/plain itself, as vLLM does


def test_odd_but_valid_bodies_are_routed(client):
    for content in ("nul \u0000 byte", "lone surrogate \ud800", "rtl \u202e mark", "emoji \U0001f600" * 100):
        body = json.dumps({**CHAT, "messages": [{"role": "user", "content": content}]}).encode()  # ASCII escapes
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.headers.get("x-served-by"), (content, r.status_code, r.text[:200])
        assert "x-epp-error-reason" not in r.headers


def test_too_many_messages_is_413(client):
    body = json.dumps({"model": MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": ""}] * 100_001}).encode()
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["x-epp-error-reason"] == "too-many-messages", r.text[:200]
    assert r.json()["error"]["param"] == "messages"
    r = client.post("/v1/messages", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"


def test_too_many_prompt_token_ids_is_413(client):
    body = b'{"model": "' + MODEL.encode() + b'", "token_ids": [' + b"1," * (4 << 20) + b"1]}"
    r = client.post("/inference/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["x-epp-error-reason"] == "prompt-too-long", r.text[:200]


def test_too_long_prompt_text_is_413(client):
    body = json.dumps({"model": MODEL, "max_tokens": 1, "prompt": "x" * ((16 << 20) + 1)}).encode()
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["x-epp-error-reason"] == "prompt-too-long", r.text[:200]


@pytest.mark.parametrize("headers", [{"x-big": "v" * 100_000}, {f"x-h{i}": "v" for i in range(150)}],
                         ids=["100KiB-header", "150-headers"])
def test_huge_headers_are_stopped_by_envoy(client, headers):
    try:
        r = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
        return  # Envoy answered 431 and closed while the client was still writing: refused all the same
    assert r.status_code == 431, r.text[:200]


def test_large_but_allowed_headers_and_odd_header_bytes_are_fine(client):
    headers = {**{f"x-h{i}": "v" * 500 for i in range(60)}, "x-latin1": b"caf\xe9 \xff".decode("latin-1"),
               "x-request-id": "\u00e9" * 10, "x-gateway-inference-objective": "x" * 4000}
    r = client.post("/v1/chat/completions", json=CHAT, headers={k: v.encode("latin-1") for k, v in headers.items()})
    assert r.status_code == 200 and r.headers["x-served-by"] == r.headers["x-epp-endpoint"], r.text[:200]
