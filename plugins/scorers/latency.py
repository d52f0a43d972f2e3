"""``predicted-latency-scorer``: one currency for every routing signal -- the predicted time to first token.

Prefix affinity, queue depth, batch slots and KV pressure are different units; weighting them against each
other (GIE's queue x2 + kv x2 + prefix x3) has no right answer across workloads: one waiting request on a
min-max queue scorer outweighs a conversation's history, and nothing says "the pod holding this prefix is
full; a cold prefill elsewhere is sooner than waiting there". This scorer predicts, per candidate, the
seconds until the request's first token there and prefers the soonest::

    ttft(e) = base + per_token * slowness(e) * (queued_prefill(e) + uncached(e)) + admission_wait(e)
              + batch_delay(e)

* ``uncached(e)``: the request's prompt tokens endpoint ``e`` does not hold, from the prefix-cache producer's
  match (in the server's tokens: see ``epp.datalayer.tokens``).
* ``queued_prefill(e)``: uncached tokens of the requests EPP sent to ``e`` whose first byte has not come back
  yet (prefill work ahead of this request). An entry also expires after a few predicted TTFTs, in case EPP
  never sees a first byte (response bodies not sent to EPP).
* ``admission_wait(e)``: with ``n`` requests in flight (EPP's count, or the server's running + waiting when
  higher: other gateways share the pods) and ``S`` batch slots, ``max(0, n + 1 - S) * occupancy(e) / S``: a
  slot frees every ``occupancy / S`` seconds on average. ``S`` is learned from the scraped metrics: the
  running count while requests kept waiting for longer than the prefill queued there explains (a real cap,
  ``max_num_seqs`` or KV space, not the steps a request waits while prefills spend the token budget; see
  ``learn_slots``). Unknown until then: no wait predicted.
* ``batch_delay(e)``: every sequence decoding at ``e`` lengthens each engine step by ``step(e)`` (the slope of
  its time per output token against the batch, learned from streamed answers); a new request waits out the
  step underway (half of one, on average) and then its own prefill step, so ``STEP_SHARE * step(e) * batch(e)``
  with ``batch(e)`` the requests decoding there (in flight, at most ``S``). Two endpoints that hold the same
  prefix are not equal when one decodes three times the other's batch.
* ``base``, ``per_token``: one line for the pool (what its endpoints share: model and accelerator), fitted by
  decayed least squares on every first byte EPP sees of a request that waited for no batch slot, the slope
  held to its prior until the data spread. ``slowness(e)``: how much slower per token than the pool endpoint
  ``e`` has been (a slowly moving geometric mean within 1/4 to 4, from first bytes of prefills of at least
  ``SLOWNESS_MIN_TOKENS`` that had no other prefill queued ahead, which tell speed rather than load): a slower
  GPU is measured, not configured. The base is common to every endpoint and slowness scales only prefill:
  load is what ``queued_prefill`` and ``admission_wait`` say, never a learned per-endpoint level -- an
  endpoint's own history mixes its speed with its load, and one never tried would look better than one in
  use, which would spread every prefix over every endpoint.
* ``occupancy`` (admission to end: decode time plus the predicted prefill, or pick to end less the predicted
  wait for responses EPP does not see stream) and, for ``objective: e2e`` and TPOT
  SLOs, the time per output token against the batch size are learned per endpoint.

Candidates are ranked by ``ttft(e)`` plus what this request's prefill at ``e`` (``work(e) = per_token *
slowness(e) * uncached(e)``) costs the others: the capacity it uses (``work``), which later requests pay
again, so a cold prefill elsewhere must save more than its own cost before it wins; and the wait of the
requests that reach ``e`` while it runs (``rate(e) * work^2 / 2``: ``rate(e)`` requests a second, EPP's picks
of ``e`` over the last ``RATE_WINDOW`` seconds, arrive during ``work`` and wait ``work / 2`` on average). A cold
prompt therefore goes where few requests follow it, not onto the endpoint a hot prefix keeps busy, while a
short prefill (a warm hit) costs its endpoint's traffic next to nothing. Likewise a request that must wait for
a batch slot at ``e`` holds one there after its wait, which puts every request arriving during that wait one
slot later (``rate(e) * admission_wait(e) * occupancy(e) / S``): a saturated endpoint spills before its queue
is long. And while it decodes it lengthens the steps of the requests arriving there
(``rate(e) * occupancy(e) * STEP_SHARE * step(e)``): load spreads by batch size where prefixes tie.

Those costs look one request ahead, and one request never pays a cold prefill to relieve a popular prefix's
holder: its own wait there is a few milliseconds, the prefill elsewhere hundreds. But the prefix's later
requests would split between two holders, each meeting fewer prefills and a smaller batch; over the prefix's
next minute that saving can exceed the one cold prefill (``_credit_replicas``). Endpoints that lack the
prefix are credited with it, so a hot prefix gets a second holder (and a third) while one holder's traffic
stands out, and no more once it does not: the tail that piling a hot prefix on one endpoint makes (half the
slowest tenth of first tokens in a Zipf-skewed trace came from it) without spreading every prefix everywhere.

SLO headers (llm-d's ``x-llm-d-slo-ttft-ms`` / ``x-llm-d-slo-tpot-ms``): endpoints predicted to meet them
rank first (soonest first among them); when none does, the smallest relative violation wins.

Every prediction is audited: the predicted TTFT of the picked endpoint against the time its first byte came
(``epp_ttft_prediction_error_seconds``, ``/debug/endpoints``).

Compared with NVIDIA Dynamo's KV-router cost (``overlap_weight * uncached prefill blocks + active prefill
blocks + decode blocks``, in blocks, weights set by hand) this is in seconds, learned, and includes batch-slot
admission; compared with llm-d's ``latency-scorer`` it needs no trained model or sidecar.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.observability.audit import SECONDS_ERROR_BUCKETS, PredictionAudit
from epp.plugin import (
    Endpoint,
    FollowsStalenessFlag,
    InferenceRequest,
    RequestObserver,
    ResponseInfo,
    SchedulingResult,
    Scorer,
    check_str,
    fresh_mask,
    monotonic,
    register_plugin,
)
from epp_plugins.scorers.prefix import PrefixSource, resolve_prefix_source

SLO_TTFT_HEADER = "x-llm-d-slo-ttft-ms"
SLO_TPOT_HEADER = "x-llm-d-slo-tpot-ms"
OBJECTIVES = ("ttft", "e2e")

# Priors, before an endpoint has answered anything: a mid-range accelerator serving a small model. They only
# rank endpoints that have no history yet; each response moves its endpoint's fit.
PRIOR_BASE = 0.02  # s: one engine step and the round trip
PRIOR_PER_TOKEN = 1e-4  # s per prefilled token (10k tokens/s)
SLOWNESS_MIN_TOKENS = 512  # only first bytes this much prefill ahead tell an endpoint's speed (not its load)
PRIOR_OCCUPANCY = 1.0  # s a request holds a batch slot after its first token
PRIOR_TPOT = 0.02  # s per output token at batch size 1
PRIOR_TPOT_PER_SEQ = 2e-4  # s per output token added by each other sequence in the batch
PRIOR_OUTPUT_TOKENS = 128.0
DECAY = 0.95  # per observation: the last ~20 responses of an endpoint carry most of its fit
_MAX_SECONDS = 600.0  # observations past this are not latencies but stuck streams
_LOG4 = math.log(4.0)
WAIT_RUN_SCRAPES = 3  # scrapes in a row with requests waiting, before saturation is believed
RATE_WINDOW = 10.0  # s: the time constant of each endpoint's pick rate
# of one engine step a new request waits for: the rest of the step underway (half, on average) and its own
STEP_SHARE = 1.5
# s a prefix's present request rate is projected forward when a copy of it is weighed. Projecting only as far as
# the prefix has been seen (Lindy) waited a minute to spread a hot prefix; replays of the pressure traces had
# lower p90 and p99 TTFT with the flat minute, on 16 s, 2 min and 10 min traces.
REPLICA_HORIZON = 60.0
MAX_PREFIXES = 4096  # prefixes whose request rate is kept (least recently requested dropped first)
_PENDING_EXPIRY = 4.0  # x the predicted TTFT (+1 s): a pending prefill EPP never saw start stops counting


class DecayedFit:
    """Least-squares line ``y = a + b x`` over observations that fade geometrically (``DECAY`` each).

    The line passes through the observations' mean, so predictions near what was seen are right from the
    first sample; the slope is the observations' own, shrunk toward the prior slope by ``strength * span^2``
    (in weight * x^2), so observations spread over a narrow range of ``x`` -- which cannot tell a slope --
    keep the prior's. No observations: the prior line. ``b`` is kept within ``[b_min, b_max]``, ``a`` >= 0."""

    __slots__ = ("_line", "a0", "b0", "b_max", "b_min", "k", "sw", "sx", "sxx", "sxy", "sy")

    def __init__(self, a: float, b: float, span: float, b_min: float, b_max: float, strength: float = 0.1) -> None:
        self.a0, self.b0, self.b_min, self.b_max = a, b, b_min, b_max
        self.k = strength * span * span
        self.sw = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self._line: tuple[float, float] | None = None  # read per endpoint and decision, changed per response

    def observe(self, x: float, y: float) -> None:
        self._line = None
        d = DECAY
        self.sw = self.sw * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    def line(self) -> tuple[float, float]:
        if self._line is not None:
            return self._line
        w = self.sw
        if w < 1e-9:
            self._line = self.a0, self.b0
            return self._line
        mx, my = self.sx / w, self.sy / w
        vxx = max(0.0, self.sxx - w * mx * mx)
        vxy = self.sxy - w * mx * my
        b = min(self.b_max, max(self.b_min, (vxy + self.k * self.b0) / (vxx + self.k)))
        self._line = max(0.0, my - b * mx), b
        return self._line

    def predict(self, x: float) -> float:
        a, b = self.line()
        return a + b * x


class EwmaValue:
    __slots__ = ("value", "weight")

    def __init__(self, prior: float, weight: float = 2.0) -> None:
        self.value, self.weight = prior, weight

    def observe(self, v: float) -> None:
        self.weight = self.weight * DECAY + 1.0
        self.value += (v - self.value) / self.weight


@dataclass(slots=True)
class DecayedRate:
    """Events a second, counted with time constant ``RATE_WINDOW``."""

    n: float = 0.0
    at: float = 0.0  # when ``n`` was last brought up to date

    def count(self, now: float) -> None:
        self.n = self.n * math.exp((self.at - now) / RATE_WINDOW) + 1.0
        self.at = now

    def rate(self, now: float, since: float) -> float:
        """About the last ``RATE_WINDOW`` seconds; over the time since ``since`` while that is shorter (no rate
        from under 1 s)."""
        return self.per_second(now, rate_window(now, since))

    def per_second(self, now: float, window: float) -> float:
        """The rate over ``window`` (``rate_window``: the same for every endpoint at one decision)."""
        return self.n * math.exp((self.at - now) / RATE_WINDOW) / window


def rate_window(now: float, since: float) -> float:
    """The seconds a ``DecayedRate`` counted since ``since`` weigh: ``RATE_WINDOW``, less while EPP is younger."""
    return RATE_WINDOW * -math.expm1(-max(now - since, 1.0) / RATE_WINDOW)


@dataclass(slots=True)
class _Pending:
    tokens: int
    expires: float


@dataclass(slots=True)
class EndpointRates:
    """What one endpoint has shown of its speed."""

    speed: EwmaValue = field(default_factory=lambda: EwmaValue(0.0, weight=20.0))  # log(observed / pooled fit)
    tpot: DecayedFit = field(default_factory=lambda: DecayedFit(PRIOR_TPOT, PRIOR_TPOT_PER_SEQ, 64, 0.0, 1.0))
    occupancy: EwmaValue = field(default_factory=lambda: EwmaValue(PRIOR_OCCUPANCY))
    slots: int = 0  # batch slots learned from the scrape; 0 = not known yet (no cap seen)
    max_running: int = 0  # most requests seen running at once
    scrape_seen: float = 0.0  # updated_at of the last scrape read
    # the current run of scrapes showing requests waiting (see learn_slots)
    run_scrapes: int = 0
    explained_until: float = 0.0
    pending: dict[int, _Pending] = field(default_factory=dict)  # request key -> prefill not started yet
    picks: DecayedRate = field(default_factory=lambda: DecayedRate())  # EPP's picks of this endpoint

    def pick_rate(self, now: float, since: float) -> float:
        """Requests a second EPP has been sending here (see ``DecayedRate``; since EPP started picking)."""
        return self.picks.rate(now, since)

    def count_pick(self, now: float) -> None:
        self.picks.count(now)

    @property
    def slowness(self) -> float:
        """How much slower than the pool's fit this endpoint answers (1 = as fitted), within [1/4, 4]."""
        return math.exp(min(_LOG4, max(-_LOG4, self.speed.value)))

    def queued_prefill(self, now: float) -> int:
        if not self.pending:
            return 0
        expired = [k for k, p in self.pending.items() if p.expires < now]
        for k in expired:
            del self.pending[k]
        return sum(p.tokens for p in self.pending.values())

    def learn_slots(self, e: Endpoint, backlog: float) -> None:
        """A server that admits at most ``S`` requests (``max_num_seqs``, or as many as its KV cache holds)
        shows it as requests waiting while ``S`` run, scrape after scrape, for longer than any prefill ahead of
        them explains. Requests also wait while prefills spend a step's token budget (chunked prefill), but
        only as long as that prefill backlog lasts. So the server is saturated once ``WAIT_RUN_SCRAPES`` or more
        consecutive scrapes show requests waiting past the time the prefill EPP knows is queued there takes
        (``backlog``: its predicted seconds, as of each scrape); ``S`` is then the running count. ``S`` also
        grows whenever more run: a server that has run more has shown it can."""
        m = e.metrics
        if m.updated_at == self.scrape_seen:
            return
        now = self.scrape_seen = m.updated_at
        running = m.running_requests
        self.max_running = max(self.max_running, running)
        if self.slots and running > self.slots:
            self.slots = running
        if m.waiting_requests <= 0 or running <= 0:
            self.run_scrapes = 0
            return
        if not self.run_scrapes:
            self.explained_until = now
        self.run_scrapes += 1
        if self.run_scrapes >= WAIT_RUN_SCRAPES and now > self.explained_until:
            self.slots = running  # a KV-bound server admits fewer when its requests are longer
        self.explained_until = max(self.explained_until, now + backlog)


@dataclass(slots=True)
class PrefixRate(DecayedRate):
    """How often requests sharing one cached prefix come."""

    first: float = 0.0  # when the prefix was first seen cached (its rate is averaged over no longer than that)


@dataclass(slots=True)
class _Pick:
    endpoint: str
    at: float
    tokens_ahead: float  # queued prefill + own uncached tokens, when picked
    prefill: float  # predicted seconds of its own prefill there
    inflight: int  # requests in flight there when picked (the server's count when higher)
    wait: float  # predicted admission wait
    predicted: float  # predicted TTFT
    batch: int  # requests in flight there, this one included
    queueing: bool  # it may wait for admission there: its first byte does not tell the prefill speed
    queued: int  # prefill tokens ahead of it there (EPP's pending requests), when picked
    batch_delay: float  # predicted seconds the batch decoding there added to its first byte
    first_byte: float | None = None


@dataclass(slots=True)
class Prediction:
    """One candidate's predicted times (seconds), kept on the request for explanations and the audit."""

    ttft: float
    wait: float
    uncached: int
    queued: int
    tpot: float
    inflight: int
    work: float  # seconds of prefill this request adds at that endpoint (its uncached tokens)
    rate: float = 0.0  # requests a second reaching that endpoint (EPP's recent picks)
    queueing: bool = False  # requests were waiting there (the last scrape) or a wait is predicted
    slot_time: float = 0.0  # s between batch slots freeing there while requests wait (occupancy / slots)
    batch_delay: float = 0.0  # s the batch decoding there adds to this request's first byte
    step_share: float = 0.0  # s each request arriving there while this one decodes waits longer for it
    occupancy: float = 0.0  # s a request holds a batch slot there
    cost: float = 0.0  # what ``score`` ranks by: ``ttft`` and what this request's prefill costs the others there


@register_plugin("predicted-latency-scorer")
class PredictedLatencyScorer(FollowsStalenessFlag, Scorer, RequestObserver):
    category = "balance"
    needs_response_body = True  # the first byte is when the prefill ended

    def __init__(self, objective: str = "ttft", prefix_plugin_name: str | None = None,
                 metrics_staleness_threshold: object = None) -> None:
        self.objective = check_str(objective, "objective", OBJECTIVES)
        self.prefix_name = check_str(prefix_plugin_name, "prefixPluginName") if prefix_plugin_name else None
        self.set_staleness(metrics_staleness_threshold)
        self._source: PrefixSource | None = None
        self.rates: dict[str, EndpointRates] = {}
        self.prefill = DecayedFit(PRIOR_BASE, PRIOR_PER_TOKEN, 4096, 1e-7, 0.1)  # the pool's, in standard tokens
        self.audit = PredictionAudit("seconds", SECONDS_ERROR_BUCKETS)
        self._key = ("predicted-latency", id(self))
        self._prefix_key = ("predicted-latency-prefix", id(self))
        self.prefixes: OrderedDict[int, PrefixRate] = OrderedDict()  # longest cached prefix -> its request rate
        self._since = 0.0  # the first pick: pick rates are averaged over no longer than EPP has been picking

    def start(self) -> None:
        self._source = resolve_prefix_source(self, self.prefix_name, required=bool(self.prefix_name))
        if self.handle is not None and self.handle.pool is not None:
            self.handle.pool.add_listener(self._forget_removed)
            self.handle.pool.add_restart_listener(self._forget_restarted)

    def stop(self) -> None:
        if self.handle is not None and self.handle.pool is not None:
            self.handle.pool.remove_listener(self._forget_removed)
            self.handle.pool.remove_restart_listener(self._forget_restarted)

    def _forget_removed(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:  # a replaced endpoint (new address) starts from the priors: it may be another machine
            self.rates.pop(e.name, None)

    def _forget_restarted(self, endpoint: Endpoint, last_seen: float) -> None:
        """A restarted server may come back with another ``max_num_seqs`` or KV size: its batch slots are learned
        again (its speed, step cost and occupancy are the hardware's and stay)."""
        r = self.rates.get(endpoint.name)
        if r is not None:
            r.slots = r.max_running = r.run_scrapes = 0
            r.explained_until = 0.0

    def prediction_audits(self) -> dict[str, PredictionAudit]:
        return {"ttft": self.audit}

    def debug_state(self) -> dict[str, object]:
        """What this scorer has learned, for /debug/endpoints."""
        base, per_token = self.prefill.line()
        now = monotonic()
        return {"base_s": round(base, 4), "per_token_ms": round(per_token * 1000, 5), "endpoints": {
            name: {"slots": r.slots, "max_running": r.max_running, "occupancy_s": round(r.occupancy.value, 3),
                   "slowness": round(r.slowness, 3), "queued_prefill": r.queued_prefill(now),
                   "pick_rate": round(r.pick_rate(now, self._since), 3)}
            for name, r in list(self.rates.items())}}

    def _rates(self, e: Endpoint) -> EndpointRates:
        r = self.rates.get(e.name)
        if r is None:
            r = self.rates[e.name] = EndpointRates()
        return r

    # -- prediction ------------------------------------------------------------------------------

    def predict(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[Prediction]:
        now = monotonic()
        base, per_token = self.prefill.line()
        prompt, matched, prefix = self._prompt_and_matches(request, endpoints)
        request.attributes[self._prefix_key] = prefix
        fresh = fresh_mask(endpoints, self.staleness)
        # Per endpoint this runs once per decision (256 endpoints: most of a decision's time), so the loop reads
        # fields rather than calling helpers; the pick rates' window is the same for every endpoint.
        window = rate_window(now, self._since)
        rates = self.rates
        out = []
        append = out.append
        for e, ok, hit in zip(endpoints, fresh, matched, strict=True):
            r = rates.get(e.name) or self._rates(e)
            m = e.metrics
            queued = r.queued_prefill(now) if r.pending else 0
            inflight = e.inflight_requests
            token_s = per_token * r.slowness  # this endpoint's seconds per prefilled token
            if ok:
                if m.updated_at != r.scrape_seen:
                    r.learn_slots(e, base + token_s * queued)
                running_waiting = m.running_requests + m.waiting_requests
                if running_waiting > inflight:
                    inflight = running_waiting
            uncached = prompt - hit if prompt > hit else 0
            slots = r.slots
            occupancy = r.occupancy.value
            wait = 0.0
            if slots:
                ahead = inflight + 1 - slots
                if ahead > 0:
                    wait = ahead * occupancy / slots
            tpot_a, tpot_b = r.tpot.line()
            step_share = STEP_SHARE * tpot_b
            batch_delay = step_share * (inflight if not slots or inflight < slots else slots)
            rate = r.picks.per_second(now, window)
            ttft = base + token_s * (queued + uncached) + wait + batch_delay
            work = token_s * uncached
            slot_time = occupancy / slots if slots else 0.0
            # A request's own prefill is paid again by others (module docstring): the capacity it takes, and the
            # wait of the requests that arrive there while it runs. Ranking by TTFT alone would buy a few
            # milliseconds for this request with a whole cold prefill on the endpoint a hot prefix needs.
            cost = ttft + work * (1.0 + 0.5 * rate * work) + rate * (wait * slot_time + occupancy * step_share)
            append(Prediction(ttft, wait, uncached, queued, tpot_a + tpot_b * (inflight + 1), inflight, work, rate,
                              wait > 0.0 or (ok and m.waiting_requests > 0), slot_time, batch_delay, step_share,
                              occupancy, cost))
        return out

    def _prompt_and_matches(self, request: InferenceRequest,
                            endpoints: Sequence[Endpoint]) -> tuple[int, list[int], int | None]:
        """The prompt's tokens, each endpoint's cached tokens of it, and the key of the longest cached prefix
        (its last matched block: what requests sharing that prefix have in common), None when none is cached."""
        if self._source is None:
            ids = request.body.prompt_token_ids
            return (len(ids) if ids is not None else 0), [0] * len(endpoints), None
        prod = self._source.prefix_producer()
        st = prod.state(request, endpoints)
        blocks = prod.match_all(st, endpoints)
        deepest = max(blocks, default=0)
        return st.prompt_tokens, [st.matched_tokens(m) for m in blocks], st.hashes[deepest - 1] if deepest else None

    def _output_tokens(self, request: InferenceRequest) -> float:
        limit = request.body.max_output_tokens
        return float(min(limit, 4096)) if limit is not None else PRIOR_OUTPUT_TOKENS

    def score(self, request: InferenceRequest, endpoints: list[Endpoint]) -> Sequence[float]:
        preds = self.predict(request, endpoints)
        request.attributes[self._key] = dict(zip((e.name for e in endpoints), preds, strict=True))
        costs = [p.cost for p in preds]
        self._credit_replicas(request, preds, costs)
        if self.objective == "e2e":
            out = self._output_tokens(request)
            costs = [c + p.tpot * out for c, p in zip(costs, preds, strict=True)]
        slo = _slo(request)
        if slo is not None:
            return _slo_scores(preds, costs, *slo)
        return _relative(costs)

    def _credit_replicas(self, request: InferenceRequest, preds: Sequence[Prediction], costs: list[float]) -> None:
        """A cold prefill of a popular prefix on an endpoint that lacks it is also an investment: the prefix's
        later requests can then split between its holders and the new one. Each endpoint ``e`` that does not
        hold the longest cached prefix is credited with what that split saves over the next ``REPLICA_HORIZON``
        seconds, at the prefix's present rate. ``d = lam / (holders + 1)`` of the
        prefix's ``lam`` requests a second move from the holder ``h`` this request would take to ``e``; every
        request arriving at ``h`` then meets ``d`` fewer prefills a second and ``d * occupancy`` fewer decoding
        sequences, every one arriving at ``e`` as many more: a saving of about ``d * (rate(h) - rate(e)) *
        (work(h)^2 + occupancy(h) * step_share(h))`` seconds a second, in the units of the costs above (the
        wait prefills impose on each other, ``rate * work^2 / 2`` per endpoint, and the batch's share of each
        step). It ends itself: once the prefix is spread, the holders' rates no longer stand out.

        The prefix's requests pile on its holders only as far as it binds them: one whose own part dwarfs the
        prefix (a long conversation under a short system prompt) spreads by load anyway, and its later turns
        follow its own history. So the credit is weighted by the share of ``e``'s prefill the prefix would save,
        ``(work(e) - work(h)) / work(e)``: about 1 for a hot system prompt under short questions. Costs credited
        below zero are shifted, not clamped: clamping tied every credited endpoint at zero, and the picker then
        chose among them at random, a busy one as soon as an idle one (long conversations, ``epp replay``).
        """
        key = request.attributes.get(self._prefix_key)
        stat = self.prefixes.get(key) if key is not None else None
        if stat is None:
            return
        now = monotonic()
        lam = stat.rate(now, stat.first)
        least = min(p.uncached for p in preds)
        holders = [k for k, p in enumerate(preds) if p.uncached == least]
        h = min(holders, key=costs.__getitem__)
        ph = preds[h]
        d = lam / (len(holders) + 1)
        per_move = ph.work * ph.work + ph.occupancy * ph.step_share
        for k, p in enumerate(preds):
            if p.uncached > least:
                bind = (p.work - ph.work) / p.work if p.work > 0.0 else 0.0
                costs[k] -= REPLICA_HORIZON * d * max(0.0, ph.rate - p.rate) * per_move * bind
        low = min(costs)
        if low < 0.0:  # credited below zero: shifted, not clamped, so the credited endpoints keep their order
            costs[:] = [c - low for c in costs]

    # -- learning --------------------------------------------------------------------------------

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        preds: dict[str, Prediction] | None = request.attributes.get(self._key)
        if not preds or not result.endpoints:
            return
        e = result.endpoints[0]
        p = preds.get(e.name)
        if p is None:
            return
        now = monotonic()
        r = self._rates(e)
        r.pending[id(request)] = _Pending(p.uncached, now + _PENDING_EXPIRY * p.ttft + 1.0)
        if not self._since:
            self._since = now
        r.count_pick(now)
        key = request.attributes.get(self._prefix_key)
        if key is not None:
            stat = self.prefixes.get(key)
            if stat is None:
                stat = self.prefixes[key] = PrefixRate(first=now)
                if len(self.prefixes) > MAX_PREFIXES:
                    self.prefixes.popitem(last=False)
            else:
                self.prefixes.move_to_end(key)
            stat.count(now)
        batch = e.inflight_requests  # the director counted this request
        request.attributes[self._key] = _Pick(e.name, now, p.queued + p.uncached, p.work, p.inflight, p.wait, p.ttft,
                                              batch, p.queueing, p.queued, p.batch_delay)

    def on_response_body(self, request: InferenceRequest, endpoint: Endpoint, chunk: bytes,
                         end_of_stream: bool) -> None:
        pick = request.attributes.get(self._key)
        if not isinstance(pick, _Pick) or pick.first_byte is not None or not chunk:
            return
        pick.first_byte = now = monotonic()
        r = self.rates.get(pick.endpoint)
        if r is None:
            return
        r.pending.pop(id(request), None)
        ttft = now - pick.at
        self.audit.record(pick.predicted, ttft)
        if ttft < _MAX_SECONDS and not pick.queueing:
            # fitted on first bytes that waited for no batch slot (admission has its own model, and a wait it
            # missed must not pass for slow prefill): the pool's line first, then how this endpoint compares
            y = ttft - pick.batch_delay  # the prefill line is fitted without the batch's share, predicted apart
            base, per_token = self.prefill.line()
            # speed only from a prefill that ran alone: a queued prefill EPP still counts may have ended (its first
            # byte not seen yet), and crediting it would make a busy endpoint look fast and draw more work
            if not pick.queued and pick.tokens_ahead >= SLOWNESS_MIN_TOKENS and y > base:
                r.speed.observe(math.log((y - base) / (per_token * pick.tokens_ahead)))
            self.prefill.observe(pick.tokens_ahead * r.slowness, y)

    def on_response_complete(self, request: InferenceRequest, endpoint: Endpoint, response: ResponseInfo) -> None:
        pick = request.attributes.get(self._key)
        if not isinstance(pick, _Pick):
            return
        r = self.rates.get(pick.endpoint)
        if r is None:
            return
        r.pending.pop(id(request), None)
        if not response.completed or not 200 <= response.status < 300:
            return
        now = monotonic()
        # A batch slot is held from admission to the end: the decode (first byte to end, when EPP saw the first
        # byte of a stream) plus the prefill the pick predicted; else pick to end less the predicted wait. Time
        # spent queueing in the server must not count, or the wait it predicts feeds on itself.
        if pick.first_byte is not None and request.body.stream:
            held = now - pick.first_byte + pick.prefill
        else:
            held = now - pick.at - pick.wait
        if held >= _MAX_SECONDS:
            return
        r.occupancy.observe(max(0.0, held))
        u = response.usage
        if pick.first_byte is not None and u is not None and u.completion_tokens and u.completion_tokens > 1 \
                and request.body.stream:
            r.tpot.observe(pick.batch, (now - pick.first_byte) / (u.completion_tokens - 1))


def _relative(costs: Sequence[float]) -> list[float]:
    """Soonest -> 1; an endpoint twice as slow -> about 0.5 (1 ms floor, so near-zero costs do not explode)."""
    best = min(costs, default=0.0)
    return [(best + 1e-3) / (c + 1e-3) for c in costs]


def _slo(request: InferenceRequest) -> tuple[float | None, float | None] | None:
    ttft = _header_ms(request.headers.get(SLO_TTFT_HEADER))
    tpot = _header_ms(request.headers.get(SLO_TPOT_HEADER))
    return None if ttft is None and tpot is None else (ttft, tpot)


def _header_ms(value: str | None) -> float | None:
    if not value:
        return None
    try:
        ms = float(value)
    except ValueError:
        return None
    return ms / 1000.0 if math.isfinite(ms) and ms > 0 else None


def _slo_scores(preds: Sequence[Prediction], costs: Sequence[float], ttft: float | None,
                tpot: float | None) -> list[float]:
    """Endpoints meeting the SLOs score in (0.5, 1] (soonest highest); the others in (0, 0.5], by how far they
    miss (relative violation, summed over the SLOs given)."""
    miss = [(max(0.0, p.ttft - ttft) / ttft if ttft else 0.0) + (max(0.0, p.tpot - tpot) / tpot if tpot else 0.0)
            for p in preds]
    meeting = [c for c, v in zip(costs, miss, strict=True) if v == 0.0]
    if meeting:
        best = min(meeting)
        return [0.5 + 0.5 * (best + 1e-3) / (c + 1e-3) if v == 0.0 else 0.5 * 0.01 / (0.01 + v)
                for c, v in zip(costs, miss, strict=True)]
    least = min(miss)
    return [0.5 * (least + 0.01) / (v + 0.01) for v in miss]
