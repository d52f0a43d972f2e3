"""The simulator without HTTP, in virtual time: what ``epp replay`` (epp/replay.py) runs a trace against.

* ``VirtualTimeLoop``: an asyncio event loop whose clock jumps to the next timer whenever nothing is ready to run,
  so a step of the engine costs the CPU time of planning it, not its modelled duration.
* ``OfflineEngine``: the simulator's engine (sim/engine.py: its scheduler, step-time model and KV cache) with its
  step loop as timer callbacks, and runs of decode steps that nobody sees applied late, all at once: the same
  results as ``Engine``'s own loop on this clock, to the last bit, for a fraction of the CPU.
* ``offline_pod`` and ``render``: one pod (engine, tokenizer, configuration) and the engine work of a request
  as its HTTP handler parses it (the same ``parse_*`` function of sim/apis/: prompt rendering, tokenizer,
  ``max_tokens`` defaults and length checks, errors as ``ApiError``), with what the response tells the client
  (streamed or not, usage).
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from asyncio import AbstractEventLoop, Handle, SelectorEventLoop
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from epp_sim.apis.base import Pod, Submission
from epp_sim.config import ResolvedConfig
from epp_sim.engine import _MAX_OVERSLEEP_CREDIT, Engine, SimRequest, Status
from epp_sim.errors import ApiError
from epp_sim.metrics import PodMetrics
from epp_sim.server import match_route
from epp_sim.tokenizer import Tokenizer

_POLL_EVERY = 64  # loop iterations between polls of real file descriptors (a syscall each)


class _JumpingSelector(selectors.DefaultSelector):
    """Where the event loop would block until its next timer, time jumps to that timer's moment instead (exactly:
    a timer set for ``t`` runs at ``t``, whatever else ran before it). File descriptors (the loop's self-pipe: a
    thread handing work back) are polled without waiting, every ``_POLL_EVERY`` iterations: virtual time does not
    wait for threads."""

    def __init__(self, start: float, next_timer: Callable[[], float]) -> None:
        super().__init__()
        self.now = start
        self._next_timer = next_timer
        self._calls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # nothing scheduled: only another thread can wake the loop, in real time
            return super().select(None)
        self._calls += 1
        if self._calls % _POLL_EVERY == 0:
            ready = super().select(0)
            if ready:
                return ready
        if timeout > 0:  # the loop has a timer, ``timeout`` ahead (rounded): go to it
            self.now = max(self.now, self._next_timer())
        return []


class VirtualTimeLoop(SelectorEventLoop):
    """An event loop in virtual time, starting at ``start`` (not 0: EPP reads a timestamp of 0 as "never")."""

    def __init__(self, start: float = 1000.0) -> None:
        self._jumping = _JumpingSelector(start, lambda: self._scheduled[0].when())
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now

    # asyncio runs the timers due before ``time() + _clock_resolution`` (the real clock's resolution, ~1 ns): here
    # one unit in the last place, so that a timer runs at its own time, never a little early with another one.
    @property  # type: ignore[override]
    def _clock_resolution(self) -> float:
        return math.ulp(self._jumping.now)

    @_clock_resolution.setter
    def _clock_resolution(self, value: float) -> None:
        pass


class _Coast:
    """Decode steps 1..k of the same requests (step 1 planned by ``Engine._schedule``, the others here), whose
    times are known in advance; steps 1..k-1 finish no request and wake no one."""

    __slots__ = ("c", "done", "ends", "k", "o", "plan", "reqs", "slow", "t0s", "targets")

    def __init__(self, plan: list[tuple[SimRequest, int]], k: int, t0s: list[float], targets: list[float],
                 ends: list[float]) -> None:
        self.plan = plan
        self.reqs = [r for r, _ in plan]
        self.k = k
        self.t0s, self.targets, self.ends = t0s, targets, ends  # per step, from index 1
        self.c = [r.num_computed for r in self.reqs]  # as step 1 was planned
        self.o = [r.num_output for r in self.reqs]
        self.done = 0  # steps applied
        self.slow: dict[int, list[int]] = {}  # step -> requests (indexes) that allocate or cache a block planning it


class OfflineEngine(Engine):
    """``Engine`` with its step loop as callbacks on a ``VirtualTimeLoop``, and runs of decode steps coasted.

    ``Engine._loop`` plans a step, sleeps its modelled duration, then applies it and plans the next: a timer and a
    task wake-up per step. Here a step is a timer whose callback applies it and plans the next, with the same
    arithmetic, so each step ends at the same moment to the last bit (the loop runs a timer at its exact time).

    Coasting: when every running request is decoding (a token each, nothing waiting, no stream to wake at each
    token, no KV events) the steps until the first one finishes a request are known in advance, times included,
    and nobody sees them but the pod's own counters and KV blocks (the free blocks are checked to suffice, so
    none is preempted). They get no timer of their own: ``sync`` applies the ones that have ended, in order and
    with the same numbers as one by one, before anything reads or changes the engine (a scrape, a submit, an
    abort) and at the timer of the step that finishes a request. A submit or abort ends the run: the step under
    way ends at its own timer and planning goes on as usual. Same results as ``Engine`` (tests/unit/test_replay.py
    compares them), a fraction of the event-loop round trips and per-step work."""

    def __init__(self, rc: ResolvedConfig, tokenizer: Tokenizer, pod_index: int = 0) -> None:
        super().__init__(rc, tokenizer, pod_index)
        self._ev: AbstractEventLoop | None = None
        self._timer: Handle | None = None
        self._idle: str | None = None  # "empty" or "blocked" (what Engine._loop waits on ``_wake`` for), or None
        self._kick: Handle | None = None
        self._credit = 0.0
        self._step: tuple[list[tuple[SimRequest, int]], float, float | None] | None = None  # plan, t0, target
        self._coast: _Coast | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._ev is None:
            self._ev = asyncio.get_running_loop()
            self._idle = "empty"
            self._poke()  # Engine._loop's first look, one loop iteration later

    async def stop(self) -> None:
        self.sync()
        for h in (self._timer, self._kick):
            if h is not None:
                h.cancel()
        self._ev = self._timer = self._kick = self._step = self._coast = None
        for req in [*self.running, *self.waiting]:
            self.abort(req)

    # -- what changes or reads the engine ----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, **kw: Any) -> SimRequest:
        self._end_coast()
        req = super().submit(prompt_ids, max_tokens, **kw)
        self._poke()
        return req

    def abort(self, req: SimRequest) -> None:
        if req.status is Status.FINISHED:
            return
        self._end_coast()
        super().abort(req)
        self._poke()

    def state(self) -> dict:
        self.sync()
        return super().state()

    def reset_prefix_cache(self) -> int:
        self.sync()
        return super().reset_prefix_cache()

    def sync(self) -> None:
        coast = self._coast
        if coast is None or self._ev is None:
            return
        now = self._ev.time()
        if now >= coast.ends[coast.done + 1] and coast.done + 1 < coast.k:
            self._coast_to(min(bisect_right(coast.ends, now, 1, coast.k) - 1, coast.k - 1))

    # -- the step loop ---------------------------------------------------------------------------------------
    def _poke(self) -> None:
        """``_wake.set()`` for a loop waiting on it: plan again one loop iteration later."""
        if self._idle is not None and self._kick is None and self._ev is not None:
            self._kick = self._ev.call_soon(self._woken)

    def _woken(self) -> None:
        self._kick = None
        if self._idle == "empty":
            self._credit = 0.0
        self._idle = None
        self._plan()

    def _plan(self) -> None:
        """The top of ``Engine._loop``: plan steps until one takes time (then its timer), or wait."""
        loop = self._ev
        assert loop is not None
        while True:
            if not self.waiting and not self.running:
                self._idle = "empty"
                return
            t0 = loop.time()
            plan, cost = self._schedule()
            if not plan:
                self._idle = "blocked"
                return
            duration = cost * self.step_time_scale
            if duration <= 0:
                self._step = (plan, t0, None)
                self._timer = loop.call_soon(self._timer_fired)  # Engine._loop: asyncio.sleep(0)
                return
            target = t0 + duration - self._credit
            delay = target - loop.time()
            if delay > 0:
                when = loop.time() + delay  # asyncio.sleep(delay): call_later
                self._step = (plan, t0, target)
                coast = self._coasting(plan, t0, target, when)
                self._timer = loop.call_at(coast.ends[coast.k] if coast else when, self._timer_fired)
                self._coast = coast
                return
            self._credit = min(max(loop.time() - target, 0.0), _MAX_OVERSLEEP_CREDIT)
            self._step_ended(plan, t0, loop.time())

    def _timer_fired(self) -> None:
        loop = self._ev
        assert loop is not None and self._step is not None
        self._timer = None
        if self._coast is not None:
            self._coast_to(self._coast.k - 1)  # the step under way is now the run's last
            self._coast = None
        plan, t0, target = self._step
        self._step = None
        if target is not None:
            self._credit = min(max(loop.time() - target, 0.0), _MAX_OVERSLEEP_CREDIT)
        self._step_ended(plan, t0, loop.time())
        self._plan()

    # -- coasting --------------------------------------------------------------------------------------------
    def _coasting(self, plan: list[tuple[SimRequest, int]], t0: float, target: float,
                  when: float) -> _Coast | None:
        """The run of decode steps starting with ``plan`` (just planned at ``t0``), or None."""
        running = self.running
        if self.waiting or self.kv.events is not None or len(plan) != len(running):
            return None
        for r, n in plan:
            if n != 1 or r.num_output == 0 or r.stream or r.prefill_only:
                return None
        k = min(r.max_tokens - r.num_output for r in running)  # step k finishes a request
        if k < 2:
            return None
        bs = self.p.block_size
        free = len(self.kv.free_queue)
        while k >= 2 and sum(max(0, -(-(r.num_computed + k) // bs) - len(r.blocks)) for r in running) > free:
            k -= 1  # never short of blocks: no preemption
        if k < 2:
            return None
        # Each step's time, as _schedule and _loop compute it (the same expression, in the same order).
        p = self.p
        n = len(plan)
        ctx = sum(r.num_computed for r in running)
        scale = self.step_time_scale
        per_step = p.step_fixed_s + p.prefill_token_s * 0 + p.decode_seq_s * n  # _schedule's sum, left to right
        per_token = p.context_token_s
        t0s, targets, ends = [0.0, t0], [0.0, target], [0.0, when]
        credit = min(max(when - target, 0.0), _MAX_OVERSLEEP_CREDIT)
        for j in range(2, k + 1):
            ctx += n
            duration = (per_step + per_token * ctx) * scale
            start = ends[j - 1]
            tgt = start + duration - credit
            delay = tgt - start
            if duration <= 0 or delay <= 0:
                k = j - 1
                break
            end = start + delay
            t0s.append(start)
            targets.append(tgt)
            ends.append(end)
            credit = min(max(end - tgt, 0.0), _MAX_OVERSLEEP_CREDIT)
        if k < 2:
            return None
        coast = _Coast(plan, k, t0s, targets, ends)
        for i, r in enumerate(coast.reqs):
            self._next_slow(coast, i, coast.c[i] + 2, len(r.blocks))
        return coast

    def _next_slow(self, coast: _Coast, i: int, pos: int, blocks: int) -> None:
        """The next step, from token position ``pos`` on, where request ``i`` leaves _schedule's decode fast path
        (its token fills a block, or needs a new one)."""
        bs = self.p.block_size
        pos = min(-(-pos // bs) * bs, max(pos, blocks * bs + 1))
        step = pos - coast.c[i]
        if step <= coast.k:
            coast.slow.setdefault(step, []).append(i)

    def _coast_to(self, q: int) -> None:
        """Apply the run's steps up to ``q`` (all ended) and plan step q + 1, as one by one they would be."""
        coast = self._coast
        assert coast is not None
        a = coast.done
        if q <= a:
            return
        reqs, ends, t0s = coast.reqs, coast.ends, coast.t0s
        n = len(reqs)
        stats = self.stats
        kv = self.kv
        c, o = coast.c, coast.o
        itl, slow = stats.itl, coast.slow
        busy = self.busy_s
        for j in range(a + 1, q + 1):
            # _apply of step j: a token each
            now = ends[j]
            busy += now - t0s[j]
            if j == 1:  # its requests' previous tokens may be of different steps
                groups: dict[float, int] = {}
                for r in reqs:
                    groups[r.last_token_time] = groups.get(r.last_token_time, 0) + 1
                for last, count in groups.items():
                    itl.observe(now - last, count)
            else:
                itl.observe(now - ends[j - 1], n)
            # _schedule of step j + 1: the requests leaving the fast path allocate or cache a block
            due = slow.pop(j + 1, None)
            if due is None:
                continue
            for i in sorted(due):
                r = reqs[i]
                r.num_computed = c[i] + j
                r.num_output = o[i] + j
                if not kv.allocate(r, r.num_computed, 1):
                    raise RuntimeError("coasting ran out of KV blocks")  # _coasting checked they suffice
                self._next_slow(coast, i, c[i] + j + 2, len(r.blocks))
        self.busy_s = busy
        steps = q - a
        stats.steps += steps
        stats.generation_tokens += n * steps
        stats.iteration_tokens.observe(n, steps)
        last = ends[q]
        for i, r in enumerate(reqs):
            r.num_computed = c[i] + q
            r.num_output = o[i] + q
            r.last_token_time = last
        coast.done = q
        self._step = (coast.plan, t0s[q + 1], coast.targets[q + 1])

    def _end_coast(self) -> None:
        """Before a submit or abort: the ended steps applied, the one under way ends at its own timer."""
        coast = self._coast
        if coast is None:
            return
        self.sync()
        self._coast = None
        end = coast.ends[coast.done + 1]
        if coast.done + 1 < coast.k:
            assert self._timer is not None and self._ev is not None
            self._timer.cancel()
            self._timer = self._ev.call_at(end, self._timer_fired)


def offline_pod(rc: ResolvedConfig, tokenizer: Tokenizer, index: int) -> Pod:
    """A pod with no server: its engine starts with ``pod.engine.start()`` in the running loop."""
    engine = OfflineEngine(rc, tokenizer, pod_index=index)
    return Pod(index=index, host="10.0.0.1", port=8000 + index, rc=rc, engine=engine, tokenizer=tokenizer,
               metrics=PodMetrics(engine), rng=random.Random(rc.base.seed * 1000 + index))


def render(pod: Pod, path: str, doc: Any) -> Submission:
    """The engine work of ``POST path`` with JSON body ``doc``: the pod's handler's own parser (``Route.parse``,
    raising its ``ApiError``). Routes that never reach the engine (``/tokenize``, ``/v1/models``, ...) need none."""
    route = match_route(path.partition("?")[0])
    if route is None:
        raise ApiError(404, "Not Found")
    return route.parse(pod, doc) if route.parse is not None else Submission()
