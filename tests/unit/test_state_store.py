"""Shared routing state (epp.state.store) against a real redis-server: picks and load cross replicas, a replica
that starts late catches up, dead replicas stop counting, and a slow or dead store costs no request."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from epp.api.types import Usage
from epp.datalayer.pool import EndpointPool, EndpointSpec
from epp.scheduling.plugins import ResponseInfo
from epp.stack.redis import RedisProcess
from epp.state.store import SharedState, StoreOptions, read_password
from epp_plugins.scorers.prefix import ApproxPrefixCacheProducer
from tests.scorers_helpers import req
from tests.state_helpers import redis_server_fixture, start_redis  # noqa: F401 - the fixture
from tests.unit.test_scorers_prefix import chat, result

TEXT = "the quick brown fox jumps over the lazy dog " * 20


class Replica:
    """One EPP replica's routing state: a pool of two endpoints, a prefix producer, the shared store."""

    def __init__(self, url: str, password: str | None = None, staleness: float = 2.0) -> None:
        self.pool = EndpointPool("p")
        self.pool.sync([EndpointSpec("a", "10.0.0.1", 8000), EndpointSpec("b", "10.0.0.2", 8000)])
        self.producer = ApproxPrefixCacheProducer(block_size_tokens=4, auto_tune=False)
        self.producer.name = "prefix"
        opts = StoreOptions(url, password, "test", 0.02, staleness, 0.3)
        self.state = SharedState(opts, self.pool, lambda: [self.producer])

    def pick(self, text: str, endpoint: str) -> None:
        r = req(text)
        e = self.pool.get(endpoint)
        self.producer.state(r, self.pool.endpoints)
        self.producer.pre_request(r, result(e))
        e.inflight_requests += 1

    def matched(self, text: str) -> dict[str, int]:
        st = self.producer.state(req(text), self.pool.endpoints)
        return {e.name: self.producer.match(st, e) for e in self.pool.endpoints}


async def test_picks_and_load_cross_replicas(redis_server: RedisProcess):
    a, b = Replica(redis_server.url), Replica(redis_server.url)
    a.state._hook(), b.state._hook()
    a.pick(TEXT, "b")
    assert b.matched(TEXT)["b"] == 0
    await a.state.sync()
    await b.state.sync()
    m = b.matched(TEXT)
    assert m["b"] > 0 and m["a"] == 0  # B now sends this prefix where A did
    eb = b.pool.get("b")
    assert (eb.inflight_requests, eb.remote_requests) == (1, 1)  # A's request counts in B's load
    eb.inflight_requests += 2  # B's own two
    await b.state.sync()
    await a.state.sync()
    assert a.pool.get("b").inflight_requests == 3 and a.pool.get("b").remote_requests == 2
    a.pool.get("b").inflight_requests -= 1  # A's request ended
    await a.state.sync()
    await b.state.sync()
    assert (eb.inflight_requests, eb.remote_requests) == (2, 0)
    assert a.state.stats.sent == 1 and b.state.stats.received == 1 and a.state.stats.received == 0
    assert b.state.stats.replicas == 2
    await a.state.stop()
    await b.state.stop()


async def test_a_late_replica_starts_warm_and_a_leaving_one_stops_counting(redis_server: RedisProcess):
    a = Replica(redis_server.url)
    a.state._hook()
    a.pick(TEXT, "a")
    await a.state.sync()
    c = Replica(redis_server.url)  # starts after A's pick
    await c.state.sync()
    assert c.matched(TEXT)["a"] > 0 and c.pool.get("a").remote_requests == 1
    await a.state.stop()  # leaves: its load entry goes at once
    await c.state.sync()
    assert c.pool.get("a").inflight_requests == 0
    await c.state.stop()


async def test_a_dead_replicas_load_stops_counting(redis_server: RedisProcess):
    a, b = Replica(redis_server.url), Replica(redis_server.url)
    a.pool.get("a").inflight_requests = 5
    await a.state.sync()
    await b.state.sync()
    assert b.pool.get("a").inflight_requests == 5
    # A's heartbeat is older than dead_after (it was SIGKILLed and never left)
    await b.state.client().zadd(b.state.k_beat, {a.state.replica: time.time() - 10})
    await b.state.sync()
    assert b.pool.get("a").inflight_requests == 0
    await b.state.stop()


async def test_store_down_then_back_loses_nothing(redis_server: RedisProcess):
    port = redis_server.port
    a, b = Replica(redis_server.url, staleness=0.2), Replica(redis_server.url, staleness=0.2)
    await a.state.start()
    await b.state.start()
    a.pool.get("a").inflight_requests = 1
    await _until(lambda: b.pool.get("a").remote_requests == 1)
    redis_server.kill()
    a.state._hook()
    a.pick(TEXT, "b")  # the request path: never waits, never raises
    await _until(lambda: not a.state.stats.up and not b.state.stats.up)
    # past max_staleness each replica routes on its own counts
    await _until(lambda: b.pool.get("a").remote_requests == 0)
    assert b.pool.get("a").inflight_requests == 0 and b.matched(TEXT)["b"] == 0
    back = RedisProcess(port, binary=redis_server.binary).start()
    try:
        await _until(lambda: b.matched(TEXT)["b"] > 0)  # the pick made while down arrives
        await _until(lambda: b.pool.get("b").remote_requests == 1 and a.state.stats.up)
    finally:
        await a.state.stop()
        await b.state.stop()
        back.stop()


async def test_a_paused_store_times_out_and_never_blocks(redis_server: RedisProcess):
    a = Replica(redis_server.url)
    await a.state.start()
    await _until(lambda: a.state.stats.up)
    redis_server.pause()
    try:
        await _until(lambda: not a.state.stats.up)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a.state._hook()
        a.pick(TEXT, "a")  # synchronous: returns whatever the store does
        assert a.matched(TEXT)["a"] > 0
        assert loop.time() - t0 < 5  # a bound, not a timing assertion: nothing awaited the store
    finally:
        redis_server.resume()
    await _until(lambda: a.state.stats.up and a.state.stats.sent == 1)
    await a.state.stop()


async def test_password_from_file_or_env(tmp_path, monkeypatch):
    server = start_redis(password="s3cret")
    try:
        secret = tmp_path / "password"
        secret.write_text("s3cret\n")
        assert read_password(str(secret)) == "s3cret"
        monkeypatch.setenv("EPP_STATE_STORE_PASSWORD", "env-pass")
        assert read_password("") == "env-pass"
        ok = Replica(server.url, password=read_password(str(secret)))
        await asyncio.wait_for(ok.state.sync(), 10)
        bad = Replica(server.url, password="wrong")
        with pytest.raises(Exception) as refused:  # redis' AuthenticationError / ResponseError
            await asyncio.wait_for(bad.state.sync(), 10)
        assert not isinstance(refused.value, TimeoutError)
        await asyncio.wait_for(ok.state.stop(), 10)
        await asyncio.wait_for(bad.state.stop(), 10)
    finally:
        server.stop()


async def _until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def test_a_completed_conversation_turn_crosses_replicas_with_its_answer(redis_server: RedisProcess):
    """The completion's insertion (the prompt as most recently used, continued by a conversation's answer) is
    shared like a pick: the next turn, sent to the other replica, matches through the answer there too."""
    a, b = Replica(redis_server.url), Replica(redis_server.url)
    a.state._hook(), b.state._hook()
    history = [{"role": "system", "content": TEXT}, {"role": "user", "content": "How quick?"},
               {"role": "assistant", "content": "Quick."}, {"role": "user", "content": "And the dog?"}]
    answer = "The dog is lazy and stays where it lies, all afternoon, by the warm stove. " * 3
    nxt = chat([*history, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}], rid="n")
    r, e = chat(history), a.pool.get("b")
    a.producer.state(r, a.pool.endpoints)
    a.producer.pre_request(r, result(e))
    event = {"choices": [{"index": 0, "delta": {"content": answer}}]}
    a.producer.on_response_body(r, e, f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode(), True)
    a.producer.on_response_complete(r, e, ResponseInfo(status=200, completed=True, usage=Usage(prompt_tokens=1)))
    await a.state.sync()
    await b.state.sync()
    here = a.producer.match(a.producer.state(nxt, a.pool.endpoints), e)
    there = b.producer.match(b.producer.state(chat(nxt.body.payload["messages"], rid="n2"), b.pool.endpoints),
                             b.pool.get("b"))
    prompt_blocks = len(a.producer.state(chat(history, rid="h"), a.pool.endpoints).hashes)
    assert there == here > prompt_blocks  # the answer's blocks too, on both replicas
    assert a.state.stats.sent == 2  # the pick and the completion
    await a.state.stop()
    await b.state.stop()
