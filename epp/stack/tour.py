"""One request through every API a vLLM server speaks, with the clients people really use
(the ``openai`` and ``anthropic`` SDKs, plain HTTP). Shared by the demo and the end-to-end tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from epp.stack import dev_import

if TYPE_CHECKING:  # dev-only SDKs, imported when the tour runs
    import anthropic
    import httpx
    import openai

MODEL = "demo-model"


@dataclass
class TourResult:
    name: str
    status: int
    served_by: str  # the pod that answered (the simulator's x-served-by header)
    picked: str  # EPP's pick (x-epp-endpoint), empty when EPP was not asked to tell
    summary: str
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.status < 300 and bool(self.served_by)


def _openai_calls(client: openai.OpenAI) -> dict[str, Callable[[], tuple[int, httpx.Headers, str]]]:
    def chat() -> tuple[int, httpx.Headers, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                                   {"role": "user", "content": "Say hello."}], max_tokens=8)
        r = raw.parse()
        return raw.status_code, raw.headers, f"{r.choices[0].message.content!r} usage={r.usage.total_tokens}"

    def chat_stream() -> tuple[int, httpx.Headers, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = next((c.usage for c in chunks if c.usage), None)
        return raw.status_code, raw.headers, f"{len(chunks)} chunks {text[:24]!r} usage={usage and usage.total_tokens}"

    def completions() -> tuple[int, httpx.Headers, str]:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
        r = raw.parse()
        return raw.status_code, raw.headers, f"{r.choices[0].text[:24]!r} usage={r.usage.total_tokens}"

    def completions_stream() -> tuple[int, httpx.Headers, str]:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                                          stream=True)
        chunks = list(raw.parse())
        return raw.status_code, raw.headers, f"{len(chunks)} chunks"

    def responses() -> tuple[int, httpx.Headers, str]:
        raw = client.responses.with_raw_response.create(model=MODEL, input="Write a haiku.", max_output_tokens=8)
        r = raw.parse()
        return raw.status_code, raw.headers, f"{r.output_text[:24]!r} usage={r.usage and r.usage.total_tokens}"

    def responses_stream() -> tuple[int, httpx.Headers, str]:
        raw = client.responses.with_raw_response.create(model=MODEL, input="Write a haiku.", max_output_tokens=8,
                                                        stream=True)
        events = list(raw.parse())
        return raw.status_code, raw.headers, f"{len(events)} events, last {events[-1].type}"

    def embeddings() -> tuple[int, httpx.Headers, str]:
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=["hello", "world"])
        r = raw.parse()
        return raw.status_code, raw.headers, f"{len(r.data)} vectors of {len(r.data[0].embedding)}"

    return {"openai chat": chat, "openai chat stream": chat_stream, "openai completions": completions,
            "openai completions stream": completions_stream, "openai responses": responses,
            "openai responses stream": responses_stream, "openai embeddings": embeddings}


def _anthropic_calls(client: anthropic.Anthropic) -> dict[str, Callable[[], tuple[int, httpx.Headers, str]]]:
    def messages() -> tuple[int, httpx.Headers, str]:
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, system="You are terse.", messages=[{"role": "user", "content": "Hello"}])
        r = raw.parse()
        return raw.status_code, raw.headers, f"{r.content[0].text[:24]!r} out={r.usage.output_tokens}"

    def messages_stream() -> tuple[int, httpx.Headers, str]:
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}], stream=True)
        events = list(raw.parse())
        return raw.status_code, raw.headers, f"{len(events)} events, last {events[-1].type}"

    def count_tokens() -> tuple[int, httpx.Headers, str]:
        raw = client.messages.with_raw_response.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "How many tokens is this?"}])
        return raw.status_code, raw.headers, f"input_tokens={raw.parse().input_tokens}"

    return {"anthropic messages": messages, "anthropic messages stream": messages_stream,
            "anthropic count_tokens": count_tokens}


def _http_calls(http: httpx.Client) -> dict[str, Callable[[], tuple[int, httpx.Headers, str]]]:
    def call(method: str, path: str, summary: Callable[[httpx.Response], str], **kw: object):
        def run() -> tuple[int, httpx.Headers, str]:
            r = http.request(method, path, **kw)  # type: ignore[arg-type]
            return r.status_code, r.headers, summary(r) if r.is_success else r.text[:80]
        return run

    return {
        "vllm generate": call("POST", "/inference/v1/generate",
                              lambda r: f"{len(r.json()['choices'][0]['token_ids'])} tokens",
                              json={"model": MODEL, "token_ids": list(range(100, 164)),
                                    "sampling_params": {"max_tokens": 8}}),
        "vllm tokenize": call("POST", "/tokenize", lambda r: f"{r.json().get('count')} tokens",
                              json={"model": MODEL, "prompt": "tokenize me please"}),
        "vllm rerank": call("POST", "/v1/rerank", lambda r: f"{len(r.json()['results'])} results",
                            json={"model": MODEL, "query": "q", "documents": ["a", "b", "c"]}),
        "audio transcription (multipart)": call(
            "POST", "/v1/audio/transcriptions", lambda r: repr(r.json()["text"][:24]),
            files={"file": ("a.wav", b"RIFF" + bytes(4096), "audio/wav")}, data={"model": MODEL}),
        "list models (GET, no body)": call("GET", "/v1/models",
                                           lambda r: ",".join(m["id"] for m in r.json()["data"])),
    }


def run_tour(base_url: str, timeout: float = 30.0) -> list[TourResult]:
    httpx, openai, anthropic = (dev_import(m) for m in ("httpx", "openai", "anthropic"))
    http = httpx.Client(base_url=base_url, timeout=timeout)
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=timeout, max_retries=0)
    ant = anthropic.Anthropic(base_url=base_url, api_key="unused", timeout=timeout, max_retries=0)
    calls = {**_openai_calls(oai), **_anthropic_calls(ant), **_http_calls(http)}
    results = []
    for name, fn in calls.items():
        t0 = time.perf_counter()
        try:
            status, headers, summary = fn()
            results.append(TourResult(name, status, headers.get("x-served-by", ""), headers.get("x-epp-endpoint", ""),
                                      summary, time.perf_counter() - t0))
        except Exception as e:  # a failed call is a result to report, not a crash of the tour
            status = getattr(getattr(e, "response", None), "status_code", 0)
            results.append(TourResult(name, status, "", "", "", time.perf_counter() - t0,
                                      error=f"{type(e).__name__}: {e}"))
    http.close()
    return results


def format_table(results: list[TourResult]) -> str:
    rows = [("API", "status", "served by", "EPP picked", "ms", "result")]
    for r in results:
        rows.append((r.name, str(r.status), r.served_by or "-", r.picked or "-", f"{r.seconds * 1000:.0f}",
                     r.error[:70] if r.error else r.summary[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    res = run_tour(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8081")
    print(format_table(res))
    print(json.dumps({"ok": sum(r.ok for r in res), "total": len(res)}))
