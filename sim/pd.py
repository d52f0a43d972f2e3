"""Prefill/decode disaggregation as llm-d's routing sidecar and vLLM's NIXL connector do it.

* A request carrying ``kv_transfer_params: {"do_remote_decode": true}`` (the sidecar sends it with
  ``max_tokens: 1``, not streamed) is prefilled and answered with one token and the ``kv_transfer_params``
  a decode pod needs to pull the KV (``do_remote_prefill``, ``remote_engine_id``, ``remote_host``,
  ``remote_port``, ``remote_block_ids``, ``tp_size``).
* A ``decode`` or ``both`` pod seeing ``x-prefiller-host-port`` acts as the sidecar: it sends the request to
  that pod first, then runs it locally with the answer's ``kv_transfer_params``. A failed prefill (pod gone,
  error) is done locally instead and counted, so requests still succeed while EPP notices the pod is gone.
* A request carrying ``do_remote_prefill`` pulls the prompt's missing blocks: ``kv_transfer_fixed_s +
  kv_transfer_token_s * tokens`` off the engine loop (NIXL reads are asynchronous), then the blocks are in the
  cache and the request's admission finds them, like blocks another request computed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from epp_sim.apis.base import Pod
from epp_sim.engine import SimRequest

log = logging.getLogger("sim.pd")

PREFILLER_HEADER = "x-prefiller-host-port"
ROLES = ("prefill", "decode", "both")
PREFILL_TIMEOUT_S = 120.0
_FORWARDED = ("x-request-id", "authorization")


def transfer_params(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("kv_transfer_params")
    return params if isinstance(params, dict) else {}


def remote_decode(body: dict[str, Any]) -> bool:
    """This request is the prefill half of a disaggregated request."""
    return transfer_params(body).get("do_remote_decode") is True


def _prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(body)
    out["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
    out["stream"] = False
    out.pop("stream_options", None)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


def _client(pod: Pod) -> aiohttp.ClientSession:
    if pod.client is None:
        pod.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PREFILL_TIMEOUT_S))
    return pod.client


async def sidecar(pod: Pod, request: web.Request, body: dict[str, Any]) -> None:
    """Decode side: prefill on the pod the header names; put its ``kv_transfer_params`` on ``body``."""
    target = request.headers.get(PREFILLER_HEADER)
    if not target or pod.role == "prefill" or transfer_params(body):
        return
    headers = {k: request.headers[k] for k in _FORWARDED if k in request.headers}
    try:
        async with _client(pod).post(f"http://{target}{request.path}", json=_prefill_body(body),
                                     headers=headers) as resp:
            answer = await resp.read()
            if resp.status != 200:
                raise ValueError(f"status {resp.status}: {answer[:200]!r}")
        params = json.loads(answer).get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            raise ValueError("no kv_transfer_params in the prefill answer")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        pod.engine.stats.pd_fallbacks += 1
        log.info("pod %s: prefill on %s failed (%s); prefilling locally", pod.address, target, e)
        return
    body["kv_transfer_params"] = params


async def pull_kv(pod: Pod, body: dict[str, Any], prompt: list[int], lora: str | None, salt: str | None) -> None:
    """Decode side: a request prefilled elsewhere brings its prompt's KV blocks here before it is scheduled."""
    if transfer_params(body).get("do_remote_prefill") is not True:
        return
    engine = pod.engine
    missing = engine.missing_prefix_tokens(prompt, lora, salt)
    rc = pod.rc.base
    await asyncio.sleep((rc.kv_transfer_fixed_s + rc.kv_transfer_token_s * missing) * engine.step_time_scale)
    engine.stats.pd_kv_pulled_tokens += engine.import_prefix(prompt, lora, salt)
    engine.stats.pd_remote_prefills += 1


async def prepare(pod: Pod, request: web.Request, body: dict[str, Any], prompt: list[int], lora: str | None,
                  salt: str | None) -> None:
    """Before a request reaches the engine: the sidecar's remote prefill, then the KV pull."""
    await sidecar(pod, request, body)
    await pull_kv(pod, body, prompt, lora, salt)


def produced(pod: Pod, body: dict[str, Any], req: SimRequest, prompt: list[int], lora: str | None,
             salt: str | None) -> dict[str, Any] | None:
    """Prefill side: the ``kv_transfer_params`` of the answer (None unless the request asked to be prefilled
    for a remote decode)."""
    if not remote_decode(body) or req.finish_reason == "abort":
        return None
    pod.engine.stats.pd_prefills += 1
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": f"sim-{pod.address}",
            "remote_block_ids": pod.engine.cached_block_ids(prompt, lora, salt), "remote_host": pod.host,
            "remote_port": pod.port, "tp_size": 1}
