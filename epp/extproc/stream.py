"""The per-stream ext_proc exchange as a sans-I/O state machine.

One ``ExtProcStream`` per HTTP request. ``receive`` takes each ``ProcessingRequest`` Envoy sends and
returns the ``ProcessingResponse`` messages to send back. When the request is complete it sets
``pending``; the caller then awaits ``route()`` (the only async step: scheduling may queue) and sends
what it returns. ``close()`` is called when the gRPC stream ends, however it ends.

Order required by Envoy in FULL_DUPLEX_STREAMED (verified on Envoy 1.40 by tests/e2e): the request-headers
response is deferred until the body is complete (the pick needs the body), then the body goes back
as ``streamed_response`` pieces with ``end_of_stream`` on the last. Response chunks are answered one
for one, immediately, so streams stay incremental (the servicer merges the answers to the chunks one socket read
brought: ``epp.extproc.servicer``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from functools import partial
from typing import Any, Protocol

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.admission.models import ModelPath, is_status
from epp.api.errors import EppError, error_body, error_headers
from epp.api.fields import MAX_MODEL_NAME_CHARS, is_model_name
from epp.api.parsing import api_for_path, decode_json_object, parse_request
from epp.api.rewrite import ModelNameRestorer, rewrite_request_model
from epp.api.types import ApiKind, ErrorStyle, InferenceRequest, ParsedBody
from epp.api.usage import UsageExtractor
from epp.clock import monotonic
from epp.config import Config
from epp.director import Decision
from epp.extproc import protocol as p
from epp.pools import PoolSelector, metadata_pool
from epp.scheduling.plugins import ResponseInfo

log = logging.getLogger(__name__)

_NONE = ProcessingMode.BodySendMode.NONE


@dataclass(slots=True)
class StreamOptions:
    max_body_bytes: int = Config.max_request_body_bytes
    max_json_depth: int = Config.max_json_depth
    decision_header: bool = False  # tell the client which endpoint EPP picked (x-epp-endpoint)
    # Size limits on what a parsed request carries (0: no limit), refused with 413. Sized for long-context
    # prompts: about 4M tokens either way, four times today's longest contexts, and below what a 32 MiB body
    # can carry, so they bind before the body limit does. A body limit alone does not bound these: a 32 MiB
    # body holds a million one-line messages or 16M token ids.
    max_messages: int = Config.max_request_messages  # chat/Anthropic messages, Responses input items
    max_prompt_chars: int = Config.max_prompt_chars  # the rendered prompt text
    max_prompt_tokens: int = Config.max_prompt_tokens  # prompts sent as token ids (completions, embeddings, generate)
    # Envoy sends a body in 16-64 KiB pieces; a direct client sending one-byte pieces must not hold the loop.
    max_body_chunks: int = Config.max_request_body_chunks
    budget: BodyBudget | None = None  # request-body bytes buffered across all streams
    trust_rewrite_header: bool = False  # see Config.trust_model_rewrite_header
    trust_objective_header: bool = False


class BodyBudget:
    """Request-body bytes held across every stream of the process, so many large bodies arriving at once
    cannot exhaust memory: each stream reserves what it buffers and releases it once the body is parsed
    (or the stream ends). Past the limit, new bytes are refused with 503."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        if self.limit and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


MAX_REQUEST_ID_CHARS = 128  # a UUID is 36


class Phase(Enum):
    REQUEST_HEADERS = auto()
    REQUEST_BODY = auto()
    ROUTING = auto()  # request complete, waiting for route()
    RESPONSE = auto()
    DONE = auto()  # answered with an immediate response, or the response completed


def _style_for_path(path: str) -> ErrorStyle:
    return ParsedBody(api_for_path(path)).error_style


def _header_int(text: str) -> int | None:
    """A non-negative decimal header value (content-length, :status); None when it is anything else.
    ``str.isdigit`` alone is not enough: it accepts "²" and 5000-digit strings that ``int()`` refuses."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None


class StreamDirector(Protocol):
    """All a stream asks of its pool's director (``epp.director.Director``): the stream sees no scheduler, pool or
    admission, so its tests can stand in a small fake."""

    def note_response_body_mode(self, sends_bodies: bool) -> None: ...
    def model_path(self, path: str) -> ModelPath | None: ...
    def model_status(self, route: ModelPath) -> dict[str, Any]: ...
    def target_model(self, model: str, header_target: str | None) -> str: ...
    def priority(self, objective: str | None) -> int: ...
    async def route(self, request: InferenceRequest, subset: Sequence[str] | None) -> Decision: ...
    def rejected(self, request: InferenceRequest | None, err: EppError) -> None: ...
    def response_headers(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None: ...
    def response_body(self, request: InferenceRequest, decision: Decision, chunk: bytes, eos: bool) -> None: ...
    def complete(self, request: InferenceRequest, decision: Decision, response: ResponseInfo) -> None: ...


def new_request_id() -> str:
    return str(uuid.uuid4())


class ExtProcStream:
    def __init__(self, director: StreamDirector, options: StreamOptions | None = None,
                 selector: PoolSelector | None = None, *, clock: Callable[[], float] = monotonic,
                 request_ids: Callable[[], str] = new_request_id,
                 after_answer: Callable[[Callable[[], None]], object] | None = None) -> None:
        """``clock``: epp.clock's by default, so ``epp replay``'s virtual time applies; ``request_ids`` makes the
        ``x-request-id`` of a request that came without one; ``after_answer`` runs the completion's bookkeeping
        (plugins, metrics, hooks: ~0.2 ms) that the answer need not wait for. The servicer passes the loop's
        ``call_soon``, which runs it once the read that ended the response has had its answers written; None
        runs it at once."""
        self.director = director  # with several pools, the request's pool's once its headers are in
        self.selector = selector
        self.options = options or StreamOptions()
        self.clock = clock
        self.request_ids = request_ids
        self.after_answer = after_answer
        self.phase = Phase.REQUEST_HEADERS
        self.started = clock()
        self.headers: dict[str, str] = {}
        self.path = "/"
        self.request: InferenceRequest | None = None
        self.decision: Decision | None = None
        self.response = ResponseInfo()
        self.error: EppError | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._reserved = 0  # bytes of self._chunks counted in options.budget
        self._header_only = False
        self._has_trailers = False
        self._generated_id: str | None = None
        self._subset: list[str] | None = None
        self._response_bodies = True  # False when Envoy is configured with response_body_mode NONE
        self._usage: UsageExtractor | None = None
        self._restorer: ModelNameRestorer | None = None
        self._completed = False
        self._model_path: ModelPath | None = None  # the /<model>/ prefix, stripped from what is forwarded
        self._route_pool: str | None = None  # the pool the route's metadata names (epp.pools)

    # -- inputs -------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return self.phase is Phase.ROUTING

    def receive(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        if msg.HasField("protocol_config"):
            self._response_bodies = msg.protocol_config.response_body_mode != _NONE
            self.director.note_response_body_mode(self._response_bodies)
        if msg.HasField("metadata_context"):
            self._read_metadata(msg.metadata_context)
        kind = msg.WhichOneof("request")
        if self.error is not None:  # answered with an immediate response: the exchange is over
            return []
        handler = _HANDLERS.get(kind) if kind else None
        if handler is None:
            return []
        try:
            return handler(self, getattr(msg, kind))
        except EppError as e:
            return self.reject(e)

    def _read_metadata(self, ctx: object) -> None:
        subset = p.metadata_value(ctx, p.SUBSET_NAMESPACE, p.SUBSET_KEY)
        if subset is not None:
            self._subset = subset.split(",") if isinstance(subset, str) else subset
        served = p.metadata_value(ctx, p.LB_NAMESPACE, p.SERVED_KEY)
        if isinstance(served, str) and served:
            self.response.served_endpoint = served
        if self.selector is not None:
            self._route_pool = metadata_pool(ctx) or self._route_pool

    def _on_request_headers(self, msg: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        if self.phase is not Phase.REQUEST_HEADERS:
            return []
        self.headers = p.header_map(msg)
        self.path = self.headers.get(":path", "/")
        if self.selector is not None:
            self.director = self.selector.select(self.headers, self._route_pool)
        self._model_path = self.director.model_path(self.path)
        if self._model_path is not None:
            self.path = self._model_path.path
            if is_status(self._model_path, self.headers.get(":method", "GET")):
                return self._status(self._model_path)
        declared = _header_int(self.headers.get("content-length", ""))
        if declared is not None and declared > self.options.max_body_bytes:
            raise self._too_large()
        if msg.end_of_stream:  # no body (e.g. GET /v1/models): route by load at once
            if self.headers.get(":method", "POST") == "POST" and api_for_path(self.path) is not ApiKind.OTHER:
                decode_json_object(b"", self.options.max_json_depth)  # raises the parsers' own empty-body error
            self._header_only = True
            self._build_request(ParsedBody(ApiKind.OTHER), b"")
            return []
        self.phase = Phase.REQUEST_BODY
        return []

    def _on_request_body(self, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self.phase is not Phase.REQUEST_BODY:
            return []
        o = self.options
        if o.max_body_chunks and len(self._chunks) >= o.max_body_chunks:
            raise EppError(413, "body-too-fragmented", f"request body arrived in more than {o.max_body_chunks} "
                           "pieces")
        body = msg.body  # each read of a bytes field copies it (upb)
        if body:
            n = len(body)
            self._size += n
            if self._size > o.max_body_bytes:
                raise self._too_large()
            if o.budget is not None:
                if not o.budget.reserve(n):
                    raise EppError(503, "body-buffer-full", "the endpoint picker is holding too many request "
                                   "bodies at once; retry shortly")
                self._reserved += n
            self._chunks.append(body)
        if msg.end_of_stream:
            self._finish_body()
        return []

    def _on_request_trailers(self, msg: pb.HttpTrailers) -> list[pb.ProcessingResponse]:
        if self.phase is Phase.REQUEST_BODY:  # trailers end a body whose last chunk had no EoS
            self._has_trailers = True
            self._finish_body()
            return []
        if self.phase is Phase.RESPONSE and not self._has_trailers:  # answered once, duplicates ignored
            self._has_trailers = True
            return [p.trailers_response(request=True)]
        return []

    def _on_response_headers(self, msg: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        if self.phase is not Phase.RESPONSE or self.request is None or self.decision is None:
            return [p.response_headers_response()]
        headers = p.header_map(msg)
        status = headers.get(":status", "0")
        self.response.status = _header_int(status) or 0
        self.response.content_type = headers.get("content-type", "")
        if not self.request.body.skip_response and self._response_bodies:
            self._usage = UsageExtractor(self.request.api,
                                         content_length=_header_int(headers.get("content-length", "")))
        self.director.response_headers(self.request, self.decision, self.response)
        add = {p.DECISION_HEADER: self.decision.primary.hostport} if self.options.decision_header else {}
        if self.decision.extras is not None:
            add.update(self.decision.extras.response_headers)
        add.update(self.request.response_headers)
        # Restoring the client's model name can change the body's length: let Envoy re-frame it.
        remove = ("content-length",) if self._restorer is not None and self._response_bodies else ()
        out = [p.response_headers_response(add or None, remove)]
        if msg.end_of_stream:
            self._complete(True)
        return out

    def _on_response_body(self, msg: pb.HttpBody) -> list[pb.ProcessingResponse]:
        chunk = msg.body
        eos = msg.end_of_stream
        if self.phase is Phase.RESPONSE and self.request is not None and self.decision is not None:
            if self.response.first_byte_at is None and chunk:
                self.response.first_byte_at = self.clock()
            self.response.bytes += len(chunk)
            if self._usage is not None:
                self._usage.feed(chunk, self.response.content_type)
            self.director.response_body(self.request, self.decision, chunk, eos)
            if self._restorer is not None:
                chunk = self._restorer.feed(chunk) + (self._restorer.flush() if eos else b"")
        out = p.body_responses(chunk, eos, request=False)
        if eos:
            self._complete(True)
        return out

    def _on_response_trailers(self, msg: pb.HttpTrailers) -> list[pb.ProcessingResponse]:
        out: list[pb.ProcessingResponse] = []
        if self._restorer is not None:  # hand back what the restorer still holds, before the trailers
            rest = self._restorer.flush()
            if rest:
                out += p.body_responses(rest, False, request=False)
        out.append(p.trailers_response(request=False))
        self._complete(True)
        return out

    # -- request assembly ---------------------------------------------------------------------

    def _request_id(self) -> str:
        """The client's ``x-request-id``, bounded where EPP keeps it (records, logs, spans, error bodies; the
        header itself goes upstream untouched), or one generated now and sent upstream and back."""
        request_id = self.headers.get(p.REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID_CHARS]
        if not request_id:
            request_id = self._generated_id = self._generated_id or self.request_ids()
        return request_id

    def _too_large(self) -> EppError:
        return EppError(413, "body-too-large",
                        f"request body exceeds the limit of {self.options.max_body_bytes} bytes")

    def _release_body(self) -> None:
        self._chunks = []
        if self._reserved and self.options.budget is not None:
            self.options.budget.release(self._reserved)
        self._reserved = 0

    def _finish_body(self) -> None:
        raw = b"".join(self._chunks)
        self._release_body()
        parsed = parse_request(self.path, raw, self.headers.get("content-type"), self.options.max_json_depth,
                               content_encoding=self.headers.get("content-encoding"))
        self._check_limits(parsed)
        self._build_request(parsed, raw)

    def _check_limits(self, parsed: ParsedBody) -> None:
        o = self.options
        payload = parsed.payload
        if o.max_messages and payload is not None and parsed.api is not ApiKind.OTHER:
            items = payload.get("input" if parsed.api is ApiKind.RESPONSES else "messages")
            if isinstance(items, list) and len(items) > o.max_messages:
                raise EppError(413, "too-many-messages", f"request has {len(items)} messages; the limit is "
                               f"{o.max_messages}", "input" if parsed.api is ApiKind.RESPONSES else "messages")
        if o.max_prompt_chars and parsed.prompt_text is not None and len(parsed.prompt_text) > o.max_prompt_chars:
            raise EppError(413, "prompt-too-long", f"prompt has {len(parsed.prompt_text)} characters; the limit "
                           f"is {o.max_prompt_chars}")
        ids = parsed.prompt_token_ids
        if o.max_prompt_tokens and ids is not None and len(ids) > o.max_prompt_tokens:
            raise EppError(413, "prompt-too-long", f"prompt has {len(ids)} token ids; the limit is "
                           f"{o.max_prompt_tokens}")

    def _build_request(self, parsed: ParsedBody, raw: bytes) -> None:
        headers = self.headers
        request_id = self._request_id()
        o = self.options
        rewrite = (p.first_header(headers, p.REWRITE_HEADERS) or "").strip() if o.trust_rewrite_header else ""
        if not is_model_name(rewrite):  # no model name (too long, control characters): ignore the header
            rewrite = ""
        target = self.director.target_model(parsed.model, rewrite or None)
        if target != parsed.model and parsed.payload is not None and parsed.model:
            raw = rewrite_request_model(parsed.payload, target)
            self._restorer = ModelNameRestorer(target, parsed.model)
        objective = p.first_header(headers, p.OBJECTIVE_HEADERS) if o.trust_objective_header else None
        self.request = InferenceRequest(
            request_id=request_id, path=self.path, method=headers.get(":method", "POST"), headers=headers,
            body=parsed, raw_body=raw, target_model=target,
            objective=objective, priority=self.director.priority(objective),
            fairness_id=(p.first_header(headers, p.FAIRNESS_HEADERS) or "default-flow")[:MAX_MODEL_NAME_CHARS],
            received_at=self.started, path_model=self._model_path.model if self._model_path else None)
        self.phase = Phase.ROUTING

    # -- routing ------------------------------------------------------------------------------

    async def route(self) -> list[pb.ProcessingResponse]:
        """Pick the endpoint for the pending request and produce the deferred responses."""
        assert self.request is not None and self.phase is Phase.ROUTING
        try:
            decision = await self.director.route(self.request, self._subset)
        except EppError as e:
            return self.reject(e)
        return self.routed(decision)

    def routed(self, decision: Decision) -> list[pb.ProcessingResponse]:
        assert self.request is not None
        self.decision = decision
        self.phase = Phase.RESPONSE
        dest = decision.destination
        set_headers = {p.DESTINATION_HEADER: dest}
        if self._generated_id:
            set_headers[p.REQUEST_ID_HEADER] = self._generated_id
        if not self._header_only:
            set_headers["content-length"] = str(len(self.request.raw_body))
        if self._model_path is not None:  # the model server sees the path without the /<model> prefix
            set_headers[":path"] = self.path
        set_headers.update(decision.result.request_headers)  # P/D: x-prefiller-host-port
        # A client's copy of a header only EPP sets goes, unless EPP overwrites it now.
        remove = [h for h in p.PROTECTED_HEADERS if h in self.headers and h not in set_headers]
        lb: dict[str, object] = {p.DESTINATION_HEADER: dest, **decision.result.request_headers}  # P/D: prefill pod
        extras = decision.extras  # observability: trace context, explanation (epp.observability.hooks)
        if extras is not None:
            set_headers.update(extras.request_headers)
            remove += extras.remove_headers
            lb.update(extras.metadata)
        out = [p.request_headers_response(set_headers, remove, {p.LB_NAMESPACE: lb})]
        if not self._header_only:
            out += p.body_responses(self.request.raw_body, not self._has_trailers, request=True)
            if self._has_trailers:
                out.append(p.trailers_response(request=True))
        return out

    def reject(self, err: EppError) -> list[pb.ProcessingResponse]:
        """Answer the client directly, in its API's error envelope."""
        if self.phase in (Phase.RESPONSE, Phase.DONE):  # too late to answer: the upstream already is
            log.warning("error after routing ignored: %r", err)
            return []
        self.error = err
        self.phase = Phase.DONE
        self.director.rejected(self.request, err)
        style = _style_for_path(self.path)  # not the parsed body's: a header-only request parses as OTHER
        request_id = self.request.request_id if self.request else self._request_id()
        log.debug("request %s rejected: %r", request_id, err)
        headers = {**error_headers(err), p.REQUEST_ID_HEADER: request_id}
        return [p.immediate_response(err.status, headers, error_body(err, style, request_id), err.reason)]

    def _status(self, route: ModelPath) -> list[pb.ProcessingResponse]:
        """``GET /<model>/status``, answered by EPP (see ``Waker.status``)."""
        self.phase = Phase.DONE
        body = json.dumps(self.director.model_status(route)).encode()
        headers = {"content-type": "application/json", p.REQUEST_ID_HEADER: self._request_id()}
        return [p.immediate_response(200, headers, body, "model-status")]

    def passthrough(self, msg: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """After an internal error: let a response message through untouched, reject a request."""
        kind = msg.WhichOneof("request")
        if self.error is not None:  # already answered with an immediate response
            return []
        if self.phase in (Phase.RESPONSE, Phase.DONE):
            if kind == "response_headers":
                return [p.response_headers_response()]
            if kind == "response_body":
                return p.body_responses(msg.response_body.body, msg.response_body.end_of_stream, request=False)
            if kind == "response_trailers":
                return [p.trailers_response(request=False)]
            return []
        return self.reject(EppError(500, "internal-error", "internal error in the endpoint picker"))

    # -- end ----------------------------------------------------------------------------------

    def _complete(self, normally: bool | None) -> None:
        """``normally`` None: the stream closed before the response's end-of-stream reached EPP; the response
        still completed if EPP saw its API's final event (see ``close``)."""
        if self._completed or self.request is None or self.decision is None:
            return
        self._completed = True
        self.phase = Phase.DONE
        if self._usage is not None:
            self.response.usage = self._usage.finish()
            self.response.outcome = self._usage.outcome
        self.response.completed = self.response.outcome is not None if normally is None else normally
        if self.after_answer is None:
            self.director.complete(self.request, self.decision, self.response)
        else:
            self.after_answer(partial(self.director.complete, self.request, self.decision, self.response))

    def close(self) -> None:
        """The gRPC stream ended. Without response bodies that is how EPP learns the response ended.

        With response bodies, a stream that closes before the body's end-of-stream (or trailers) still ends
        a complete response when EPP saw the API's final event (``[DONE]``, ``message_stop``,
        ``response.completed``, a whole JSON body): clients stop reading there and drop the connection
        (the OpenAI SDK does), and Envoy then resets this stream before the model server's end-of-stream,
        which often trails the last event, reaches EPP. EPP answered that event before the client could
        read it, so it did see it."""
        self._release_body()  # a stream that died mid-body
        if not self._completed:
            self._complete(None if self._response_bodies else self.response.status > 0)


# One lookup per message (every streamed response chunk is one): the handler for each ``request`` oneof case.
_HANDLERS = {kind: getattr(ExtProcStream, f"_on_{kind}") for kind in (
    "request_headers", "request_body", "request_trailers", "response_headers", "response_body", "response_trailers")}
