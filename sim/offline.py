"""The simulator without HTTP, in virtual time: what ``epp replay`` (epp/replay.py) runs a trace against.

* ``VirtualTimeLoop``: an asyncio event loop whose clock jumps to the next timer whenever nothing is ready to run.
  The engine's own step loop (``Engine._loop``: plan a step, sleep its modelled duration, apply it) runs on it
  unchanged, so a step costs the CPU time of planning it, not its modelled duration.
* ``offline_pod`` and ``render``: one pod (engine, tokenizer, configuration) and the engine work of a request
  as its HTTP handler parses it (the same ``parse_*`` function of sim/apis/: prompt rendering, tokenizer,
  ``max_tokens`` defaults and length checks, errors as ``ApiError``), with what the response tells the client
  (streamed or not, usage).
"""

from __future__ import annotations

import random
import selectors
from asyncio import SelectorEventLoop
from typing import Any

from sim.apis.base import Pod, Submission
from sim.config import ResolvedConfig
from sim.engine import Engine
from sim.errors import ApiError
from sim.metrics import PodMetrics
from sim.server import match_route
from sim.tokenizer import Tokenizer

_POLL_EVERY = 64  # loop iterations between polls of real file descriptors (a syscall each)


class _JumpingSelector(selectors.DefaultSelector):
    """Where the event loop would block for ``timeout`` seconds, time jumps by ``timeout`` instead. File
    descriptors (the loop's self-pipe: a thread handing work back) are polled without waiting, every
    ``_POLL_EVERY`` iterations: virtual time does not wait for threads."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.now = start
        self._calls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only another thread can wake the loop, in real time
            return super().select(None)
        self._calls += 1
        if self._calls % _POLL_EVERY == 0:
            ready = super().select(0)
            if ready:
                return ready
        if timeout > 0:
            self.now += timeout
        return []


class VirtualTimeLoop(SelectorEventLoop):
    """An event loop in virtual time, starting at ``start`` (not 0: EPP reads a timestamp of 0 as "never")."""

    def __init__(self, start: float = 1000.0) -> None:
        self._jumping = _JumpingSelector(start)
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now


def offline_pod(rc: ResolvedConfig, tokenizer: Tokenizer, index: int) -> Pod:
    """A pod with no server: its engine starts with ``pod.engine.start()`` in the running loop."""
    engine = Engine(rc, tokenizer, pod_index=index)
    return Pod(index=index, host="10.0.0.1", port=8000 + index, rc=rc, engine=engine, tokenizer=tokenizer,
               metrics=PodMetrics(engine), rng=random.Random(rc.base.seed * 1000 + index))


def render(pod: Pod, path: str, doc: Any) -> Submission:
    """The engine work of ``POST path`` with JSON body ``doc``: the pod's handler's own parser (``Route.parse``,
    raising its ``ApiError``). Routes that never reach the engine (``/tokenize``, ``/v1/models``, ...) need none."""
    route = match_route(path.partition("?")[0])
    if route is None:
        raise ApiError(404, "Not Found")
    return route.parse(pod, doc) if route.parse is not None else Submission()
