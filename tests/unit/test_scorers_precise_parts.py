"""Precise prefix pieces without sockets: the decoder (both encodings, both hash forms), the index (stores,
removals, clears, LoRA roots, speculative entries) and tokenization matching the simulator's."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import msgpack
import pytest

from epp.api.types import ApiKind, InferenceRequest, ParsedBody
from epp_plugins.scorers.precise.events import BadEvent, BlockStored, decode_batch
from epp_plugins.scorers.precise.index import BlockIndex, BlockKeys
from epp_plugins.scorers.precise.tokenize import LocalTokenizer, special_splitter
from epp_sim.kv_events import msgpack_encode, to_map, to_wire
from epp_sim.model_files import write_model_dir
from epp_sim.prompts import chat_segments
from epp_sim.tokenizer import load_tokenizer

TOKENS = list(range(100, 164))  # 4 blocks of 16


@pytest.mark.parametrize("wire", [to_wire, to_map])
@pytest.mark.parametrize("form", ["int", "bytes"])
def test_both_encodings_and_hash_forms_decode_alike(wire, form):
    stored = ("BlockStored", [2**64 - 1, 7, 8, 9], None, TOKENS, 16, "lora-a")
    payload = msgpack_encode([1.5, [wire(stored, form), wire(("BlockRemoved", [7]), form),
                                    wire(("AllBlocksCleared",), form)], 0])
    events, rejects = decode_batch(payload)
    assert not rejects and len(events) == 3
    ev = events[0]
    assert isinstance(ev, BlockStored) and ev.hashes == [2**64 - 1, 7, 8, 9] and ev.lora == "lora-a"
    assert ev.medium == "gpu" and ev.tokens == TOKENS


def test_bad_events_are_rejected_one_by_one():
    payload = msgpack.packb([0.0, [["BlockExploded"], ["BlockStored", "x"], ["AllBlocksCleared"]], 0])
    events, rejects = decode_batch(payload)
    assert len(events) == 1 and sorted(r.reason for r in rejects) == ["unknown-tag", "wrong-type"]
    with pytest.raises(BadEvent):
        decode_batch(payload[:-2])


def test_index_follows_stores_removals_and_clears():
    keys = BlockKeys(16)
    index = BlockIndex(keys)
    a, b = index.slot("a"), index.slot("b")
    index.store(a, BlockStored([1, 2], None, TOKENS[:32], 16, None, "gpu", None))
    index.store(a, BlockStored([3, 4], 2, TOKENS[32:], 16, None, "gpu", None))
    index.store(b, BlockStored([11], None, TOKENS[:16], 16, None, "gpu", None))
    request = keys.chain(TOKENS, keys.root(None, None))
    assert index.match(request, {a: "a", b: "b"}) == {"a": 4, "b": 1}
    index.remove(a, [3])
    assert index.match(request, {a: "a", b: "b"}) == {"a": 2, "b": 1}
    index.clear(a)
    assert index.match(request, {a: "a", b: "b"}) == {"a": 0, "b": 1}
    # engine blocks of 64 tokens = 4 of ours; an orphan (unknown parent) is skipped
    index.store(a, BlockStored([99], None, TOKENS, 64, None, "gpu", None))
    index.store(a, BlockStored([100], 12345, TOKENS, 64, None, "gpu", None))
    assert index.skipped["orphan"] == 1
    assert index.match(request, {a: "a"}) == {"a": 4}
    lora = keys.chain(TOKENS, keys.root("lora-a", None))
    assert index.match(lora, {a: "a"}) == {"a": 0}  # an adapter's blocks are not the base model's


def test_speculative_entries_expire():
    keys = BlockKeys(16)
    index = BlockIndex(keys, speculative_ttl=2.0)
    request = keys.chain(TOKENS, keys.root(None, None))
    index.speculate("a", request)
    assert index.match(request, {index.slot("a"): "a"}) == {"a": 4}
    index.expire(now=time.monotonic() + 3.0)
    assert index.match(request, {index.slot("a"): "a"}) == {"a": 0}


def _request(api: ApiKind, payload: dict) -> InferenceRequest:
    return InferenceRequest("r", "/", "POST", {}, ParsedBody(api=api, model="m", payload=payload), b"")


def test_tokens_match_the_simulator_for_every_chat_api(tmp_path: Path):
    local = LocalTokenizer(str(write_model_dir(tmp_path / "model")))
    sim = load_tokenizer("deepseek", 128256)
    system = "You answer questions about the ledger.\nBe brief. " * 40
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"b": 1, "a": 2}}}]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is due?"}]
    want = sim.encode_segments(chat_segments(messages, tools))
    chat = local.request_tokens(_request(ApiKind.CHAT_COMPLETIONS, {"messages": messages, "tools": tools}))
    responses = local.request_tokens(_request(ApiKind.RESPONSES, {"instructions": system, "input": "What is due?",
                                                                  "tools": tools}))
    anthropic = local.request_tokens(_request(ApiKind.MESSAGES, {"system": system, "tools": tools, "messages": [
        {"role": "user", "content": "What is due?"}]}))
    assert chat == responses == anthropic == want
    hits = local.cache.hits
    local.request_tokens(_request(ApiKind.CHAT_COMPLETIONS, {"messages": messages, "tools": tools}))
    assert local.cache.hits > hits  # the system prompt's tokens came from the cache
    long = ("A paragraph of text about ledgers and audits.\n" * 2000)  # cut into cached chunks, exactly
    assert local.encode(long, add_special_tokens=False) == sim.encode(long)


async def test_pods_render_when_no_tokenizer_is_configured(tmp_path: Path):
    """Without ``tokenizer`` the producer asks a pod (render, else ``/tokenize`` with messages), in the request's
    prepare step: every chat API gets the ids the pod's engine uses; an unreachable pod leaves the request to the
    approximate index."""
    from epp.datalayer.endpoint import Endpoint
    from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer
    from epp_sim.config import DEFAULT_MODEL, SimConfig
    from epp_sim.server import SimCluster

    local = LocalTokenizer(str(write_model_dir(tmp_path / "model")))
    system = "You answer questions about the ledger.\nBe brief. " * 40
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is due?"}]
    payloads = [(ApiKind.CHAT_COMPLETIONS, {"messages": messages}),
                (ApiKind.RESPONSES, {"instructions": system, "input": "What is due?"}),
                (ApiKind.MESSAGES, {"system": system, "messages": [{"role": "user", "content": "What is due?"}]}),
                (ApiKind.COMPLETIONS, {"prompt": system})]
    producer = PrecisePrefixCacheProducer()
    assert producer.prepares
    async with SimCluster(SimConfig(tokenizer="deepseek"), n=1) as c:
        host, port = c.addresses[0].rsplit(":", 1)
        pod = Endpoint("pod", host, int(port))
        for no_render in (False, True):  # vLLM without the render endpoints: /tokenize
            producer.renderer._cache.clear()
            if no_render:
                producer.renderer._no_render.add(f"http://{pod.hostport}")
            got = []
            for api, payload in payloads:
                r = _request(api, payload)
                r.body.model = DEFAULT_MODEL
                if api == ApiKind.COMPLETIONS:
                    r.body.prompt_text = payload["prompt"]
                await producer.prepare_request(r, [pod])
                st = producer.state(r, [pod])
                assert st.precise, (api, no_render)
                got.append(producer._tokens(r))
            want = local.request_tokens(_request(ApiKind.CHAT_COMPLETIONS, {"messages": messages}))
            assert got[0] == got[1] == got[2] == want
            assert got[3] == local.encode(system, add_special_tokens=True)
        await producer.renderer.close()
    gone = _request(ApiKind.CHAT_COMPLETIONS, {"messages": [*messages, {"role": "user", "content": "again"}]})
    await producer.prepare_request(gone, [pod])  # the pod is gone: connection refused
    assert not producer.state(gone, [pod]).precise and producer.renderer.failures == 1
    await producer.renderer.close()


async def test_director_renders_on_a_pod_with_the_shipped_config():
    """manifests/examples/precise-prefix.yaml as shipped (no tokenizer): the director awaits the pod render
    before scheduling, so the request is keyed by the pod's own token ids."""
    import json

    from epp.datalayer.pool import EndpointPool, EndpointSpec
    from epp.director import Director
    from epp.scheduling.config import load_config
    from epp_sim.config import DEFAULT_MODEL, SimConfig
    from epp_sim.server import SimCluster

    shipped = Path(__file__).parents[2] / "manifests/examples/precise-prefix.yaml"
    async with SimCluster(SimConfig(tokenizer="deepseek"), n=1) as c:
        host, port = c.addresses[0].rsplit(":", 1)
        pool = EndpointPool()
        pool.sync([EndpointSpec("pod", host, int(port), {})])
        config = None
        try:
            config = load_config(shipped.read_text(), pool)  # starts the producer's ingestion thread
            director = Director(pool, config)
            producer = config.plugins["precise-prefix-cache-producer"]
            assert director.preparers == [producer]
            doc = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Close the month. " * 50}]}
            body = ParsedBody(api=ApiKind.CHAT_COMPLETIONS, model=DEFAULT_MODEL, payload=doc)
            r = InferenceRequest("r1", "/v1/chat/completions", "POST", {}, body, json.dumps(doc).encode(),
                                 target_model=DEFAULT_MODEL)
            decision = await director.route(r, None)
            assert decision.primary.name == "pod"
            assert producer.state(r, [decision.primary]).precise
            assert producer.renderer.failures == 0
        finally:
            if config is not None:
                for p in config.plugins.values():
                    p.stop()  # joins the ingestion thread (bounded)
                await config.plugins["precise-prefix-cache-producer"].renderer.close()


@pytest.mark.parametrize("specials", [
    ["<|end|>", "<|user|>", "<|u", "<|user|><|end|>", "[INST]", "[/INST]", "<s>", "</s>"],  # scanned
    ["<|end|>", "<s>", "Assistant:", " <pad>"],  # a token starts with a letter or a space: the regex
])
def test_special_splitter_cuts_as_the_regex_does(specials: list[str]) -> None:
    regex = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
    split = special_splitter(specials)
    assert split is not None
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "<", "|", "[", "/", ">", "u", "s", *specials]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert split(text) == regex.split(text), text
    assert special_splitter([]) is None


async def test_much_new_prompt_text_is_tokenized_on_a_worker_thread(tmp_path: Path, monkeypatch) -> None:
    """A new long system prompt is encoded off the event loop (prepare_request); a new question alone is not
    worth the hop. Either way the ids are the ones the engine computes."""
    from epp_plugins.scorers.precise import producer as module
    from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer

    p = PrecisePrefixCacheProducer(tokenizer=str(write_model_dir(tmp_path / "model")))
    assert p.prepares and p.local is not None
    hops: list[int] = []
    real = module.asyncio.to_thread

    async def counting(fn, *args):
        hops.append(sum(map(len, args[0])))
        return await real(fn, *args)

    monkeypatch.setattr(module.asyncio, "to_thread", counting)
    system = "The ledger lists every transfer of the quarter, line by line.\n" * 300  # ~19k characters
    sim = load_tokenizer("deepseek", 128256)
    for question, offloaded in (("What is due?", True), ("And what was paid?", False)):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        r = _request(ApiKind.CHAT_COMPLETIONS, {"messages": messages})
        await p.prepare_request(r, [])
        assert bool(hops) is offloaded and (not hops or hops[0] >= module.OFFLOAD_CHARS)
        hops.clear()
        assert p._tokens(r) == sim.encode_segments(chat_segments(messages, None))


def test_a_head_cut_before_a_word_tokenizes_as_the_whole(tmp_path: Path) -> None:
    """``head`` cuts before a space between two letters: its ids are exactly the whole text's first ids."""
    local = LocalTokenizer(str(write_model_dir(tmp_path / "model")))
    rng = random.Random(5)
    words = ["ledger", "audit", "Quarter", "transfer's", "naïve", "12", "3.5%", "(see", "below)", "—", "数据", "ok,"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))
        got = local.head(text, rng.randint(1, len(text) // 3))
        if got is None:
            continue
        ids, cut = got
        assert text[cut] == " " and text[cut - 1].isalpha() and text[cut + 1].isalpha()
        assert local.encode(text, add_special_tokens=False)[: len(ids)] == ids, text[:cut]
    assert local.head("word " * 10, 40) is None  # no cut within the first half


async def test_untokenized_text_no_endpoint_can_match_is_estimated(tmp_path: Path, monkeypatch) -> None:
    """A new question after a cached system prompt is encoded only as far as the block it starts in when no
    endpoint holds that block: the match is the one full tokenization gives, the prompt's length is estimated.
    When an endpoint does hold it (the same prompt again, or its events arrive before the pick), the whole
    prompt is tokenized and the match goes on into the question."""
    from types import SimpleNamespace

    from epp.datalayer.endpoint import Endpoint
    from epp.scheduling.plugins import ProfileResult, SchedulingResult
    from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer, _Partial
    from epp_plugins.scorers.precise.subscriber import IngestStats

    p = PrecisePrefixCacheProducer(tokenizer=str(write_model_dir(tmp_path / "model")))
    local = p.local
    assert local is not None
    eps = [Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)]
    stats = IngestStats()
    p.ingestor = SimpleNamespace(stats=stats)
    for e in eps:
        p.index.slot(e.name)
        stats.last_frame[e.name] = time.monotonic()  # both endpoints' events are live
    rng = random.Random(3)
    words = ["ledger", "audit", "quarter", "transfer", "balance", "entry", "account", "review", "total", "due"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    system = text(1500)
    sim = load_tokenizer("deepseek", 128256)
    encoded: list[int] = []
    real = local.encode_texts

    def counting(texts: list[str]) -> list[list[int]]:
        encoded.append(sum(map(len, texts)))
        return real(texts)

    def request(question: str, prompt: str | None = None) -> tuple[InferenceRequest, list[int]]:
        messages = [{"role": "system", "content": prompt or system}, {"role": "user", "content": question}]
        return (_request(ApiKind.CHAT_COMPLETIONS, {"messages": messages}),
                sim.encode_segments(chat_segments(messages, None)))

    def store(name: str, ids: list[int]) -> None:
        n = len(ids) // 16
        p.index.apply(p.index.slot(name), [BlockStored(list(range(1, n + 1)), None, ids[: n * 16], 16, None, "gpu",
                                                       None)])

    def full_match(ids: list[int]) -> dict[str, int]:
        keys = p.keys.chain(ids, p.keys.root(None, None), p.max_blocks)
        return p.index.match(keys, {p.index.slot(e.name): e.name for e in eps})

    warm, warm_ids = request(text(200))
    await p.prepare_request(warm, eps)  # nothing learned yet: tokenized in full (and chars per token learned)
    assert p._tokens(warm) == warm_ids and local.chars_per_token()
    store("a", warm_ids[:-200])  # endpoint a holds the system prompt (and what precedes the question)

    monkeypatch.setattr(local, "encode_texts", counting)
    question = text(200)
    r, ids = request(question)
    await p.prepare_request(r, eps)
    part = r.attributes[(p._key, "tokens")]
    assert isinstance(part, _Partial) and ids[: len(part.ids)] == part.ids
    assert sum(encoded) < len(question) / 4  # the question was encoded only as far as its first block
    st = p.state(r, eps)
    assert st.hashes == p.keys.chain(ids, p.keys.root(None, None), p.max_blocks)[: len(st.hashes)]
    assert p.match_all(st, eps) == [full_match(ids)["a"], 0] and full_match(ids)["a"] > 0
    assert abs(st.prompt_tokens - len(ids)) <= 0.05 * len(ids) and abs(st.blocks - len(ids) // 16) <= 2
    # picked with speculative indexing: what was tokenized is speculated at once; the rest is encoded (and
    # speculated) only when a later request's run stops where that speculation does, as the same prompt sent
    # again does before the endpoint's events arrive
    p.speculative, p.index.ttl = True, 2.0
    encoded.clear()
    p.pre_request(r, SchedulingResult({"default": ProfileResult([eps[1]])}, "default"))
    assert full_match(ids)["b"] == len(st.hashes) and not encoded
    retry, _ = request(question)
    await p.prepare_request(retry, eps)
    assert p._tokens(retry) == ids
    assert p.match_all(p.state(retry, eps), eps)[1] == len(ids) // 16
    # a new system prompt: its first request is encoded as far as its first block; the next one, arriving when
    # the endpoint has published only the first of its blocks, still matches the whole system prompt there
    new_system = text(1500)
    first, first_ids = request(text(200), new_system)
    await p.prepare_request(first, eps)
    assert isinstance(first.attributes[(p._key, "tokens")], _Partial) and len(p.state(first, eps).hashes) == 1
    p.pre_request(first, SchedulingResult({"default": ProfileResult([eps[1]])}, "default"))
    store("b", first_ids[:64])
    second, second_ids = request(text(200), new_system)
    await p.prepare_request(second, eps)
    shared = next(i for i, (x, y) in enumerate(zip(first_ids, second_ids, strict=False)) if x != y) // 16
    assert p.match_all(p.state(second, eps), eps)[1] == shared > 4
    p.speculative, p.index.ttl = False, 0.0
    p.index.speculative.clear()

    # a holds the whole prompt (it served it): the same prompt is tokenized in full and matched to its end
    store("a", ids)
    local.cache = type(local.cache)()  # as if the question's encoding after the pick were gone
    encoded.clear()
    again, _ = request(question)
    await p.prepare_request(again, eps)
    assert p._tokens(again) == ids and sum(encoded) >= len(question)
    st = p.state(again, eps)
    assert p.match_all(st, eps) == [len(ids) // 16, 0] and st.prompt_tokens == len(ids)

    # events arriving between prepare_request and the pick: the rest is encoded then
    later, later_ids = request(text(200))
    await p.prepare_request(later, eps)
    assert isinstance(later.attributes[(p._key, "tokens")], _Partial)
    store("b", later_ids)
    st = p.state(later, eps)
    assert st.prompt_tokens == len(later_ids) and p.match_all(st, eps)[1] == len(later_ids) // 16

    # an endpoint matched by the approximate fallback (its events stopped): every token is computed
    del stats.last_frame["b"]
    fallback, fallback_ids = request(text(200))
    await p.prepare_request(fallback, eps)
    assert p._tokens(fallback) == fallback_ids


@pytest.mark.parametrize("tokens", [[1, True], [1, -1], [1, 1 << 32], [1, 2.0], [1, None], "ab"])
def test_token_ids_are_checked_without_a_call_per_token(tokens) -> None:
    """Token ids and vLLM's int hashes are checked in C on the ingestion thread; what was refused still is, and a
    list of plain hashes is taken as it is (no per-hash call, no copy)."""
    from epp_plugins.scorers.precise.events import _hash_list

    bad = msgpack_encode([0.0, [["BlockStored", [1], None, tokens, 2]], 0])
    events, rejects = decode_batch(bad)
    assert not events and [r.reason for r in rejects] == ["wrong-type"]
    hashes = [0, 7, (1 << 64) - 1]
    assert _hash_list(hashes) is hashes
    assert _hash_list([-1, 2]) == [(1 << 64) - 1, 2]
    with pytest.raises(BadEvent):
        _hash_list([True])
