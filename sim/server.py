"""HTTP side: one aiohttp application per simulated pod, all pods in one event loop.

Every path is matched by suffix, so `/<gateway-prefix>/v1/chat/completions` works. Every response,
errors and SSE included, carries `x-served-by: host:port`, `x-sim-body-sha256` / `x-sim-body-len` of the
request body as received, and `x-sim-request-id` echoing the request's `x-request-id`. A request carrying
`x-sim-echo-request` also gets `x-sim-request-headers` (the names of the headers the pod received) and
`x-sim-request-model` (the `model` of the body it received).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from epp_sim import sleep
from epp_sim.apis import anthropic, misc, openai, pooling, responses
from epp_sim.apis.base import BODY_KEY, REQS_KEY, STREAM_KEY, Handler, Parser, Pod, StreamCut, json_response, parse_json
from epp_sim.config import SimConfig
from epp_sim.engine import Engine
from epp_sim.errors import ApiError, error_bytes
from epp_sim.kv_events import KVEventLog
from epp_sim.metrics import PodMetrics
from epp_sim.pd import ROLES
from epp_sim.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("sim")

POD_KEY = web.AppKey("sim_pod", Pod)
EVENTS_KEY = web.AppKey("sim_kv_events", KVEventLog)
MAX_BODY = 256 * 1024 * 1024
BENCH_ID_HEADER = "x-bench-id"  # a request carrying it is timed in Pod.timings
ECHO_HEADER = "x-sim-echo-request"  # a request carrying it gets what the pod received back in headers


@dataclass(frozen=True, slots=True)
class Route:
    suffix: str
    methods: tuple[str, ...]
    handler: Handler
    inference: bool = True  # subject to the hang/fail/delay faults
    json: bool = True  # parse the body as JSON before calling the handler
    anthropic: bool = False  # errors in Anthropic's envelope
    parse: Parser | None = None  # the request as engine work, as the handler parses it (sim/offline.py)


# -- admin handlers --------------------------------------------------------------------------------------
async def _health(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    if pod.faults.health == "error":
        return json_response({"detail": "engine unhealthy (injected)"}, status=503)
    return web.Response(status=200)


async def _metrics(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    mode = pod.faults.metrics
    if mode == "error":
        return web.Response(status=500, text="Internal Server Error")
    if mode == "garbage":
        return web.Response(text="vllm:num_requests_running{model_name= 3 oops\n\x00{not prometheus}\n",
                            content_type="text/plain")
    if mode == "empty":
        return web.Response(status=200, body=b"", headers={"Content-Type": CONTENT_TYPE_LATEST})
    if mode == "slow":
        await asyncio.sleep(pod.faults.metrics_delay_s)
    return web.Response(body=pod.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _control(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    result: dict[str, Any] = {}
    if request.method == "POST":
        doc = parse_json(request)
        pod.faults.update(doc)
        if doc.get("reset"):
            pod.engine.step_time_scale = 1.0
        if "step_time_scale" in doc:
            scale = doc["step_time_scale"]
            if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 <= scale <= 1000:
                raise ApiError(400, "step_time_scale: must be a number between 0 and 1000",
                               param="step_time_scale")
            pod.engine.step_time_scale = float(scale)
        if doc.get("reset_prefix_cache"):
            result["prefix_blocks_dropped"] = pod.engine.reset_prefix_cache()
    result.update(faults=pod.faults.as_dict(), step_time_scale=pod.engine.step_time_scale)
    return json_response(result)


async def _state(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    return json_response({"pod": pod.address, "role": pod.role, "model": pod.rc.model_label,
                          "profile": pod.rc.profile.name,
                          **pod.engine.state(), "faults": pod.faults.as_dict(), "sleep": pod.sleep.as_dict(pod)})


async def _kv_events(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    events = request.app.get(EVENTS_KEY)
    if events is None:
        raise ApiError(404, "KV events are off; start the sim with --kv-events-buffer N or --kv-events")
    if request.method == "POST":  # publish faults for tests (epp_sim.kv_events)
        body = parse_json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        try:
            return json_response(events.control(body))
        except (TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None
    try:
        after = int(request.query.get("after", "-1"))
    except ValueError:
        raise ApiError(400, "after must be an integer", param="after") from None
    return json_response({"last_seq": events.seq, "batches": events.since(after)})


async def _timings(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    """What ``Pod.timings`` holds, handed over once: the list is emptied."""
    out = list(pod.timings)
    pod.timings.clear()
    return json_response({"timings": out})


async def _reset_prefix_cache(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    pod.engine.reset_prefix_cache()
    return web.Response(status=200)


_POST = ("POST",)
_GET = ("GET", "HEAD")
ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions/render", _POST, misc.render_chat_request),
    Route("/v1/completions/render", _POST, misc.render_completions),
    Route("/v1/responses/render", _POST, misc.render_responses),
    Route("/v1/chat/completions", _POST, openai.chat_completions, parse=openai.parse_chat),
    Route("/v1/completions", _POST, openai.completions, parse=openai.parse_completions),
    Route("/v1/responses", _POST, responses.responses, parse=responses.parse_responses),
    Route("/v1/embeddings", _POST, pooling.embeddings, parse=pooling.parse_embeddings),
    Route("/v1/messages/count_tokens", _POST, anthropic.count_tokens, anthropic=True),
    Route("/v1/messages", _POST, anthropic.messages, anthropic=True, parse=anthropic.parse_messages),
    Route("/inference/v1/generate", _POST, openai.generate, parse=openai.parse_generate),
    Route("/detokenize", _POST, misc.detokenize),
    Route("/tokenize", _POST, misc.tokenize),
    Route("/score", _POST, pooling.score, parse=pooling.parse_score),
    Route("/rerank", _POST, pooling.rerank, parse=pooling.parse_rerank),
    Route("/classify", _POST, pooling.classify, parse=pooling.parse_classify),
    Route("/invocations", _POST, misc.invocations, parse=misc.parse_invocations),
    Route("/v1/audio/transcriptions", _POST, misc.transcriptions, json=False),
    Route("/v1/models", _GET, misc.models, json=False),
    Route("/health", _GET, _health, inference=False, json=False),
    Route("/ping", (*_GET, "POST"), _health, inference=False, json=False),
    Route("/metrics", _GET, _metrics, inference=False, json=False),
    Route("/sim/control", ("GET", "POST"), _control, inference=False, json=False),
    Route("/sim/state", _GET, _state, inference=False, json=False),
    Route("/sim/timings", _GET, _timings, inference=False, json=False),
    Route("/sim/kv_events", (*_GET, "POST"), _kv_events, inference=False, json=False),
    Route("/reset_prefix_cache", _POST, _reset_prefix_cache, inference=False, json=False),
    Route("/sleep", _POST, sleep.sleep, inference=False, json=False),
    Route("/wake_up", _POST, sleep.wake_up, inference=False, json=False),
    Route("/is_sleeping", _GET, sleep.is_sleeping, inference=False, json=False),
)


def match_route(path: str) -> Route | None:
    for route in ROUTES:
        if path.endswith(route.suffix):
            return route
    return None


# -- the one aiohttp handler -----------------------------------------------------------------------------
async def dispatch(request: web.Request) -> web.StreamResponse:
    pod = request.app[POD_KEY]
    received = time.monotonic()
    route = match_route(request.path)
    anthropic_style = route is not None and route.anthropic
    try:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            request[BODY_KEY] = b""
            raise ApiError(413, f"Request body exceeds {MAX_BODY} bytes") from None
        request[BODY_KEY] = body
        if route is None:
            return json_response({"detail": "Not Found"}, status=404)
        if request.method not in route.methods:
            return json_response({"detail": "Method Not Allowed"}, status=405)
        faults = pod.faults
        hang = faults.hang
        if hang and (route.inference or (hang == "all" and not route.suffix.startswith("/sim/"))):
            await asyncio.Event().wait()  # never answers; cancelled when the client goes away
        if route.inference and faults.should_fail(pod.rng):
            status = faults.fail_status or 500
            raise ApiError(status, f"Injected failure (status {status}) by /sim/control")
        if route.inference and "POST" in route.methods:
            sleep.check_awake(pod)  # GET /v1/models answers while asleep
        doc = parse_json(request) if route.json else None
        return await route.handler(pod, request, doc)
    except ApiError as err:
        stream = request.get(STREAM_KEY)
        if stream is not None:  # headers already sent: report in-band, as vLLM does mid-stream
            await _in_band_error(stream, err, anthropic_style)
            return stream
        return web.Response(body=error_bytes(err, anthropic_style), status=err.status,
                            content_type="application/json")
    except (StreamCut, ConnectionError):
        stream = request.get(STREAM_KEY)
        if stream is not None:
            return stream
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the server must never die on a request
        log.exception("unhandled error on %s %s", request.method, request.path)
        stream = request.get(STREAM_KEY)
        if stream is not None:
            return stream
        err = ApiError(500, f"Internal server error: {type(exc).__name__}: {exc}")
        return web.Response(body=error_bytes(err, anthropic_style), status=500,
                            content_type="application/json")
    finally:
        reqs = request.get(REQS_KEY, ())
        for req in reqs:
            if not req.finished:
                pod.engine.abort(req)
        bench_id = request.headers.get(BENCH_ID_HEADER) or _bench_request_id(request.headers.get("x-request-id"))
        if bench_id is not None and reqs:
            pod.timings.append((bench_id[:64], received, reqs[0].first_token_time))


def _bench_request_id(request_id: str | None) -> str | None:
    """The benchmark client's id from its ``x-request-id`` (``bench-<id>``), for routers that forward only that."""
    return request_id[6:] if request_id is not None and request_id.startswith("bench-") else None


async def _in_band_error(stream: web.StreamResponse, err: ApiError, anthropic_style: bool) -> None:
    payload = error_bytes(err, anthropic_style)
    data = (b"event: error\ndata: " + payload + b"\n\n") if anthropic_style else (
        b"data: " + payload + b"\n\ndata: [DONE]\n\n")
    with contextlib.suppress(ConnectionError):
        await stream.write(data)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    pod = request.app[POD_KEY]
    body: bytes = request.get(BODY_KEY, b"")
    h = response.headers
    h["x-served-by"] = pod.address
    h["x-sim-body-sha256"] = hashlib.sha256(body).hexdigest()
    h["x-sim-body-len"] = str(len(body))
    rid = request.headers.get("x-request-id")
    if rid is not None:
        h["x-sim-request-id"] = rid
    if ECHO_HEADER in request.headers:  # what the pod received, for tests of what a gateway lets through
        h["x-sim-request-headers"] = ",".join(sorted({k.lower() for k in request.headers}))
        model = _body_model(body)
        if model is not None:
            h["x-sim-request-model"] = model


def _body_model(body: bytes) -> str | None:
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("model"), str):
            return doc["model"].encode("ascii", "backslashreplace").decode()
    return None


def build_app(pod: Pod, events: KVEventLog | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 65536})
    app[POD_KEY] = pod
    if events is not None:
        app[EVENTS_KEY] = events
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_response_prepare.append(_add_headers)
    return app


# -- a cluster of pods -----------------------------------------------------------------------------------
class SimCluster:
    """N simulated vLLM pods on consecutive ports (base_port 0 picks free ports), in the running loop.

    Usage::

        cluster = SimCluster(SimConfig(profile="fast"), n=3, host="127.0.0.1", base_port=18100)
        await cluster.start()
        ... cluster.addresses ...  # ["127.0.0.1:18100", ...]
        await cluster.stop()
    """

    def __init__(self, config: SimConfig, n: int = 1, host: str = "127.0.0.1", base_port: int = 0,
                 tokenizer: Tokenizer | None = None) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        bad = [r for r in config.roles if r not in ROLES]
        if bad:
            raise ValueError(f"unknown role(s) {bad}; choose among {list(ROLES)}")
        self.config = config
        self.rc = config.resolved()
        self.n = n
        self.host = host
        self.base_port = base_port
        self.tokenizer = tokenizer or load_tokenizer(config.tokenizer, config.vocab_size)
        self.pods: list[Pod] = []
        self._runners: list[web.AppRunner] = []
        self._events: list[KVEventLog] = []

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.pods]

    @property
    def urls(self) -> list[str]:
        return [f"http://{a}" for a in self.addresses]

    async def start(self) -> None:
        try:
            for i in range(self.n):
                await self._start_pod(i)
        except BaseException:
            await self.stop()
            raise

    async def _start_pod(self, i: int) -> None:
        engine = Engine(self.rc, self.tokenizer, pod_index=i)
        pod = Pod(index=i, host=self.host, port=0, rc=self.rc, engine=engine, tokenizer=self.tokenizer,
                  metrics=PodMetrics(engine), rng=random.Random(self.config.seed * 1000 + i),
                  role=self.config.roles[i] if i < len(self.config.roles) else "both")
        events = None
        port = self.base_port + i if self.base_port else 0
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        pod.port = sock.getsockname()[1]
        self.pods.append(pod)
        cfg = self.config
        if cfg.kv_events or cfg.kv_events_buffer > 0:
            topic = cfg.kv_events_topic
            if topic is None:
                topic = f"kv@{pod.address}@{self.rc.model_label}"
            events = KVEventLog(cfg.kv_events_buffer or 1024, cfg.kv_events, topic, i, cfg.kv_events_encoding,
                                cfg.kv_events_hash, cfg.kv_events_replay)
            self._events.append(events)
            engine.on_kv_events.append(events.on_events)
        runner = web.AppRunner(build_app(pod, events), handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=0.25)
        await runner.setup()
        self._runners.append(runner)
        site = web.SockSite(runner, sock)
        await site.start()
        engine.start()

    async def stop(self) -> None:
        # Engines first: in-flight requests end at once (503), so the servers drain without waiting.
        for pod in self.pods:
            await pod.engine.stop()
        results = await asyncio.gather(*(r.cleanup() for r in self._runners), return_exceptions=True)
        self._runners.clear()
        for res in results:
            if isinstance(res, BaseException):
                log.warning("pod shutdown: %r", res)
        for events in self._events:
            events.close()
        self._events.clear()
        for pod in self.pods:
            if pod.client is not None:
                await pod.client.close()
                pod.client = None

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
