"""vLLM's sleep mode (``--enable-sleep-mode``), as the endpoints a wake-on-request router drives:

* ``POST /sleep?level=1`` (weights offloaded to CPU RAM) or ``level=2`` (weights discarded): the KV cache is
  dropped (prefix cache emptied) and inference requests are refused with 503 until woken. Refused with 400
  while requests are in flight (drain first).
* ``POST /wake_up``: returns once the engine can serve, after the wake latency of the level it slept at
  (``--wake-latency-ms``, default 600 ms from level 1; ``--wake-latency-level2-ms``, default 2000 ms, from
  level 2). Concurrent calls share one wake. Awake already: returns at once.
* ``GET /is_sleeping``: ``{"is_sleeping": bool}``.

The engine's state is also in ``vllm:engine_sleep_state{sleep_state="awake"|"weights_offloaded"|
"discard_all"}`` (1 for the current state) and in ``GET /sim/state`` (``sleep``: level, sleeps, wakes).
``GET /v1/models`` answers while asleep.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from epp_sim.errors import ApiError

if TYPE_CHECKING:
    from epp_sim.apis.base import Pod

SLEEP_STATES = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}


@dataclass
class SleepMode:
    sleeps: int = 0
    wakes: int = 0
    waking: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self, pod: Pod) -> dict[str, Any]:
        return {"level": pod.engine.sleep_level, "waking": self.waking is not None, "sleeps": self.sleeps,
                "wakes": self.wakes}


def check_awake(pod: Pod) -> None:
    """Inference on a sleeping engine is refused."""
    if pod.engine.sleep_level:
        raise ApiError(503, "The engine is sleeping; POST /wake_up first")


async def sleep(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    try:
        level = int(request.query.get("level", "1"))
    except ValueError:
        level = 0
    if level not in (1, 2):
        raise ApiError(400, "level must be 1 or 2", param="level")
    engine = pod.engine
    if engine.running or engine.waiting:
        raise ApiError(400, f"{len(engine.running) + len(engine.waiting)} requests in flight; drain them first")
    if pod.sleep.waking is not None:
        raise ApiError(400, "waking up; try again once awake")
    if not engine.sleep_level:
        pod.sleep.sleeps += 1
        engine.reset_prefix_cache()
    engine.sleep_level = max(engine.sleep_level, level)
    return web.Response(status=200)


async def wake_up(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    mode = pod.sleep
    if pod.engine.sleep_level and mode.waking is None:
        mode.waking = asyncio.get_running_loop().create_task(_wake(pod))  # outlives a caller that goes away
    if mode.waking is not None:
        await asyncio.shield(mode.waking)
    return web.Response(status=200)


async def _wake(pod: Pod) -> None:
    engine = pod.engine
    base = pod.rc.base
    try:
        await asyncio.sleep(base.wake_latency_level2_s if engine.sleep_level >= 2 else base.wake_latency_s)
        engine.sleep_level = 0
        pod.sleep.wakes += 1
    finally:
        pod.sleep.waking = None


async def is_sleeping(pod: Pod, request: web.Request, doc: Any) -> web.StreamResponse:
    return web.json_response({"is_sleeping": bool(pod.engine.sleep_level)})
