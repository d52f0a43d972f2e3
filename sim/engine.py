"""The simulated engine: a vLLM V1-style scheduler step loop over a paged, prefix-cached KV cache.

Each step the scheduler (FCFS, chunked prefill always on) first gives running requests their tokens
(one for a decoding request, the rest of the prompt up to the token budget for a prefilling one),
preempting the most recently admitted running request when KV blocks run out (recompute: it goes back to
the front of the waiting queue, its blocks freed but still cached). If nothing was preempted it then admits
waiting requests in order while `max_num_seqs`, the token budget, `max_loras` and free blocks allow; a
waiting request first adopts its longest cached prefix. The step then "runs" for

    fixed + prefill_token_s * prefill tokens + decode_seq_s * decoding seqs + context_token_s * their context

after which every request whose known tokens are all computed samples one token. Output tokens are drawn
up front from a RNG seeded by (seed, prompt), so a given prompt always gets the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from array import array
from collections import deque
from collections.abc import Callable
from enum import Enum
from operator import itemgetter
from typing import Any

import xxhash

from epp_sim.config import ResolvedConfig
from epp_sim.kv_cache import KVCacheManager, chain_hashes, hash_root
from epp_sim.stats import EngineStats
from epp_sim.tokenizer import Tokenizer

_MAX_OVERSLEEP_CREDIT = 0.005


class Status(Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3


class SimRequest:
    __slots__ = (
        "_bs",
        "all_ids",
        "arrival",
        "blocks",
        "cached_tokens",
        "event",
        "finish_reason",
        "first_scheduled",
        "first_token_time",
        "hashes",
        "last_token_time",
        "length_reason",
        "lora",
        "max_tokens",
        "num_cached_blocks",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_prompt",
        "output_text",
        "prefill_only",
        "rid",
        "root",
        "status",
        "stream",
        "token_bytes",
    )

    def __init__(self, rid: str, prompt_ids: list[int], output_ids: list[int], output_text: list[str],
                 max_tokens: int, *, block_size: int, root: int, lora: str | None, stream: bool,
                 prefill_only: bool, length_reason: str, arrival: float, prompt_bytes: bytes | None = None) -> None:
        self.rid = rid
        self.all_ids = prompt_ids + output_ids
        if prompt_bytes is None:
            prompt_bytes = array("I", prompt_ids).tobytes()
        self.token_bytes = prompt_bytes + array("I", output_ids).tobytes() if output_ids else prompt_bytes
        self.num_prompt = len(prompt_ids)
        self.output_text = output_text
        self.max_tokens = max_tokens
        self.length_reason = length_reason
        self.lora = lora
        self.stream = stream
        self.prefill_only = prefill_only
        self.root = root
        self._bs = block_size
        self.hashes: list[int] = []
        self.blocks: list[int] = []
        self.num_cached_blocks = 0
        self.num_computed = 0
        self.num_output = 0
        self.num_preemptions = 0
        self.cached_tokens: int | None = None
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.arrival = arrival
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time = 0.0
        self.event = asyncio.Event()

    # -- what the KV cache needs -----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """Tokens known so far: the prompt plus what has been sampled."""
        return self.num_prompt + self.num_output

    def block_hash(self, index: int) -> int:
        hs = self.hashes
        if index >= len(hs):
            # Hash every full block the request will ever have in one go; xxh3 over 64 bytes is ~100 ns.
            upto = max(index + 1, len(self.all_ids) // self._bs)
            parent = hs[-1] if hs else self.root
            hs.extend(chain_hashes(self.token_bytes, parent, len(hs), upto, self._bs))
        return hs[index]

    def block_hashes(self, n: int) -> list[int]:
        if n > len(self.hashes):
            self.block_hash(n - 1)
        return self.hashes

    def block_tokens(self, index: int) -> list[int]:
        return self.all_ids[index * self._bs:(index + 1) * self._bs]

    # -- what the API handlers use ---------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.num_prompt:self.num_prompt + self.num_output]

    async def wait(self, seen: int) -> int:
        """Wait until more than `seen` tokens exist or the request finished; return the token count."""
        while self.num_output <= seen and self.status is not Status.FINISHED:
            self.event.clear()
            await self.event.wait()
        return self.num_output


class Engine:
    def __init__(self, rc: ResolvedConfig, tokenizer: Tokenizer, pod_index: int = 0) -> None:
        p = rc.profile
        self.rc = rc
        self.p = p
        self.tokenizer = tokenizer
        self.sleep_level = 0  # vLLM sleep mode: 0 awake, 1 weights offloaded, 2 weights discarded (sim/sleep.py)
        self.kv = KVCacheManager(p.num_gpu_blocks, p.block_size, rc.base.enable_prefix_caching,
                                 collect_events=rc.base.kv_events_buffer > 0 or bool(rc.base.kv_events))
        self.stats = EngineStats(p.max_model_len)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.step_time_scale = 1.0
        self.max_loras = max(1, rc.base.max_loras)
        self._out_ids, self._out_text = tokenizer.output_vocab()
        self._seed = rc.base.seed
        self._ids = itertools.count()
        self._pod_tag = f"{pod_index:02x}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.on_kv_events: list[Callable[[list[tuple[Any, ...]]], None]] = []  # per-step KV event sinks
        self.busy_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for req in [*self.running, *self.waiting]:
            self.abort(req)

    # -- requests --------------------------------------------------------------------------------------
    def next_id(self) -> str:
        # Deterministic per pod: the pod tag keeps ids unique across pods of one cluster.
        return f"{self._pod_tag}{next(self._ids):014x}"

    def submit(self, prompt_ids: list[int], max_tokens: int, *, stream: bool = False, lora: str | None = None,
               cache_salt: str | None = None, prefill_only: bool = False, explicit_max: bool = True,
               rid: str | None = None) -> SimRequest:
        if prefill_only:
            max_tokens = 0
        bs = self.p.block_size
        model_key = lora or self.rc.model_label
        root = hash_root(model_key, cache_salt, self._seed)
        prompt_bytes = array("I", prompt_ids).tobytes()
        if max_tokens > 0:
            rng = random.Random(xxhash.xxh3_64_intdigest(prompt_bytes, seed=root))
            picks = rng.choices(range(len(self._out_ids)), k=max_tokens)
            if max_tokens > 1:
                pick = itemgetter(*picks)
                out_ids, out_text = list(pick(self._out_ids)), list(pick(self._out_text))
            else:
                out_ids, out_text = [self._out_ids[picks[0]]], [self._out_text[picks[0]]]
        else:
            out_ids, out_text = [], []
        req = SimRequest(rid or self.next_id(), prompt_ids, out_ids, out_text, max_tokens, block_size=bs,
                         root=root, lora=lora, stream=stream, prefill_only=prefill_only,
                         length_reason="length" if explicit_max else "stop",
                         arrival=asyncio.get_running_loop().time(), prompt_bytes=prompt_bytes)
        self.waiting.append(req)
        self._wake.set()
        return req

    def abort(self, req: SimRequest) -> None:
        if req.status is Status.FINISHED:
            return
        if req.status is Status.WAITING:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.running.remove(req)
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        self.stats.finished["abort"] += 1
        req.event.set()
        self._wake.set()

    def reset_prefix_cache(self) -> int:
        return self.kv.reset_prefix_cache()

    def sync(self) -> None:
        """Bring the state up to the event loop's present before reading it: a no-op here, where every step is
        applied when it ends (sim/offline.py's engine applies steps no one sees late)."""

    # -- P/D: KV blocks computed elsewhere (sim/pd.py) -----------------------------------------------------
    def _probe(self, prompt_ids: list[int], lora: str | None, cache_salt: str | None) -> SimRequest:
        """A request the scheduler never sees, to look up or store a prompt's blocks."""
        root = hash_root(lora or self.rc.model_label, cache_salt, self._seed)
        return SimRequest("kv-probe", prompt_ids, [], [], 0, block_size=self.p.block_size, root=root, lora=lora,
                          stream=False, prefill_only=True, length_reason="stop", arrival=0.0)

    def missing_prefix_tokens(self, prompt_ids: list[int], lora: str | None = None,
                              cache_salt: str | None = None) -> int:
        """Tokens of the prompt's cacheable blocks this cache does not hold (what a KV pull moves)."""
        req = self._probe(prompt_ids, lora, cache_salt)
        full = (len(prompt_ids) - 1) // self.p.block_size
        return (full - len(self.kv.lookup(req))) * self.p.block_size

    def import_prefix(self, prompt_ids: list[int], lora: str | None = None, cache_salt: str | None = None) -> int:
        """Store the prompt's cacheable blocks as if computed here (pulled from a prefill pod): allocated,
        hashed, then freed into the cache, where the request's own admission finds them. Returns the tokens
        stored; 0 when they were there already or the cache has no room (the decode then recomputes them)."""
        req = self._probe(prompt_ids, lora, cache_salt)
        bs = self.p.block_size
        hits = self.kv.lookup(req)
        have, full = len(hits) * bs, (len(prompt_ids) - 1) // bs * bs
        if full <= have or not self.kv.allocate(req, have, full - have, hits):
            return 0
        self.kv.free(req)
        return full - have

    def cached_block_ids(self, prompt_ids: list[int], lora: str | None = None,
                         cache_salt: str | None = None) -> list[int]:
        """Block ids holding the prompt's prefix (a prefill pod's ``remote_block_ids``)."""
        return self.kv.lookup(self._probe(prompt_ids, lora, cache_salt))

    # -- the step loop ---------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        credit = 0.0  # time we overslept last step, taken off the next sleep so timing does not drift
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                credit = 0.0
                continue
            t0 = loop.time()
            plan, cost = self._schedule()
            if not plan:
                self._wake.clear()
                await self._wake.wait()
                continue
            duration = cost * self.step_time_scale
            if duration > 0:
                target = t0 + duration - credit
                delay = target - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                credit = min(max(loop.time() - target, 0.0), _MAX_OVERSLEEP_CREDIT)
            else:
                await asyncio.sleep(0)
            self._step_ended(plan, t0, loop.time())

    def _step_ended(self, plan: list[tuple[SimRequest, int]], t0: float, now: float) -> None:
        """The step planned at ``t0`` ended at ``now``: busy time, its tokens, its KV events."""
        self.busy_s += now - t0
        self._apply(plan, now)
        if self.kv.events:
            events = self.kv.drain_events()
            for cb in self.on_kv_events:
                cb(events)

    def _schedule(self) -> tuple[list[tuple[SimRequest, int]], float]:
        p = self.p
        kv = self.kv
        budget = p.max_num_batched_tokens
        plan: list[tuple[SimRequest, int]] = []
        prefill_tokens = decode_seqs = context_tokens = 0
        preempted = False
        running = self.running

        bs = p.block_size
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            total = req.num_computed + n
            if n == 1 and total % bs and total <= len(req.blocks) * bs:
                # Decode fast path: the token lands in a block the request already holds and does not
                # fill it, so there is nothing to allocate or cache (the common case, 15 steps in 16).
                plan.append((req, 1))
                budget -= 1
                if req.num_output > 0:
                    decode_seqs += 1
                    context_tokens += req.num_computed
                else:
                    prefill_tokens += 1
                i += 1
                continue
            while not kv.allocate(req, req.num_computed, n):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break
            plan.append((req, n))
            budget -= n
            if n == 1 and req.num_output > 0:
                decode_seqs += 1
                context_tokens += req.num_computed
            else:
                prefill_tokens += n
            i += 1

        if not preempted and self.waiting:
            now = asyncio.get_running_loop().time()
            loras = {r.lora for r in running if r.lora}
            skipped: list[SimRequest] = []
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < p.max_num_seqs:
                req = waiting[0]
                if req.lora and req.lora not in loras and len(loras) >= self.max_loras:
                    skipped.append(waiting.popleft())
                    continue
                hits = kv.lookup(req)
                num_computed = len(hits) * bs
                n = min(req.num_tokens - num_computed, budget)
                if not kv.allocate(req, num_computed, n, hits):
                    break  # head-of-line: vLLM does not skip ahead when memory is short
                waiting.popleft()
                req.num_computed = num_computed
                req.status = Status.RUNNING
                if req.cached_tokens is None:
                    req.cached_tokens = num_computed
                    req.first_scheduled = now
                    self.stats.prefix_queries += req.num_tokens
                    self.stats.prefix_hits += num_computed
                    self.stats.queue_time.observe(now - req.arrival)
                running.append(req)
                if req.lora:
                    loras.add(req.lora)
                plan.append((req, n))
                budget -= n
                prefill_tokens += n
            if skipped:
                waiting.extendleft(reversed(skipped))

        cost = 0.0
        if plan:
            cost = (p.step_fixed_s + p.prefill_token_s * prefill_tokens + p.decode_seq_s * decode_seqs
                    + p.context_token_s * context_tokens)
            self.stats.iteration_tokens.observe(p.max_num_batched_tokens - budget)
        return plan, cost

    def _preempt(self, req: SimRequest) -> None:
        self.kv.free(req)
        req.status = Status.WAITING
        req.num_computed = 0
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _apply(self, plan: list[tuple[SimRequest, int]], now: float) -> None:
        stats = self.stats
        stats.steps += 1
        finished = False
        itl_groups: dict[float, int] = {}
        new_tokens = 0
        for req, n in plan:
            if req.status is not Status.RUNNING:  # aborted while the step ran
                continue
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk; the prompt is not done yet
            if req.prefill_only:
                self._finish(req, "stop", now)
                finished = True
                continue
            req.num_output += 1
            new_tokens += 1
            if req.num_output == 1:
                req.first_token_time = now
                stats.ttft.observe(now - req.arrival)
                stats.prompt_tokens += req.num_prompt
            else:
                last = req.last_token_time
                itl_groups[last] = itl_groups.get(last, 0) + 1
            req.last_token_time = now
            if req.num_output >= req.max_tokens:
                self._finish(req, req.length_reason, now)
                finished = True
            elif req.stream:
                req.event.set()
        stats.generation_tokens += new_tokens
        for last, count in itl_groups.items():
            stats.itl.observe(now - last, count)
        if finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]

    def _finish(self, req: SimRequest, reason: str, now: float) -> None:
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        s = self.stats
        s.finished[reason] += 1
        s.e2e.observe(now - req.arrival)
        s.request_prompt_tokens.observe(req.num_prompt)
        if req.prefill_only:
            s.prompt_tokens += req.num_prompt
        else:
            s.request_generation_tokens.observe(req.num_output)
            s.request_max_tokens.observe(req.max_tokens)
            first = req.first_token_time or now
            if req.num_output > 1:
                s.tpot.observe((now - first) / (req.num_output - 1))
            s.decode_time.observe(now - first)
        if req.first_scheduled is not None:
            s.inference_time.observe(now - req.first_scheduled)
            s.prefill_time.observe((req.first_token_time or now) - req.first_scheduled)
        req.event.set()

    # -- introspection ---------------------------------------------------------------------------------
    def state(self) -> dict:
        kv = self.kv
        s = self.stats
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_used,
            "kv_blocks_free": kv.num_free,
            "kv_blocks_cached": kv.num_cached,
            "kv_cache_usage": kv.usage,
            "kv_evictions": kv.evictions,
            "block_size": kv.block_size,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "num_preemptions": s.preemptions,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "steps": s.steps,
            "busy_s": round(self.busy_s, 6),
            "finished": dict(s.finished),
            "running_loras": sorted({r.lora for r in self.running if r.lora}),
            "waiting_loras": sorted({r.lora for r in self.waiting if r.lora}),
            "step_time_scale": self.step_time_scale,
            "pd": {"prefills": s.pd_prefills, "remote_prefills": s.pd_remote_prefills,
                   "kv_pulled_tokens": s.pd_kv_pulled_tokens, "fallbacks": s.pd_fallbacks},
        }
