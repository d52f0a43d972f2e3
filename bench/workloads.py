"""Seeded open-loop workloads: the same seed gives the same arrival times and the same request contents
against every target.

* ``shared-prefix``: G groups, each a long system prompt (thousands of tokens), + a short unique question.
* ``multi-turn``: chat sessions; each turn resends the history (previous answers included) + a new question.
* ``unique``: prompts that share nothing (what a prefix-aware router cannot help with).
* ``mixed-apis``: the shared-prefix structure spread over all six APIs (OpenAI chat, completions,
  Responses, embeddings; Anthropic messages; vLLM generate with token ids).

Arrivals are a Poisson process at ``rate`` requests/s for ``duration`` s. Prompt lengths are counted in the
simulator's pseudo-tokens (a word of n letters is ceil(n/4) tokens), so the sizes below are what the pods
compute.

The pressure suite (PRESSURE, ``python -m bench.quality --suite pressure``) uses the same builders with
``text="natural"``: common English words, counted in DeepSeek-V3 tokens (the pods run the same tokenizer,
``python -m epp_sim --tokenizer deepseek``), about 6.3 characters per token instead of the pseudo-tokenizer's 4,
plus Zipf-skewed groups, rate bursts and short multi-turn sessions. See bench/README.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import Planned, Result
from epp_sim.tokenizer import PseudoTokenizer, Tokenizer, load_tokenizer

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
APIS = ("chat", "completions", "responses", "messages", "generate", "embeddings")


def poisson_arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


class TextGen:
    """Pseudo-English from a seeded vocabulary, sized in simulator tokens."""

    def __init__(self, seed: int = 0, vocab: int = 6000) -> None:
        rng = random.Random(f"vocab-{seed}")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
        self.words = ["".join(rng.choices(letters, weights, k=rng.choice((2, 3, 3, 4, 4, 5, 6, 7, 8, 9))))
                      for _ in range(vocab)]

    def text(self, rng: random.Random, tokens: int) -> str:
        out: list[str] = []
        n = 0
        while n < tokens:
            w = rng.choice(self.words)
            if rng.random() < 0.08:
                w += "."
            out.append(w)
            n += math.ceil(len(w) / 4)
        return " ".join(out)


@functools.cache
def deepseek() -> Tokenizer:
    """The tokenizer the pressure suite's pods run (``python -m epp_sim --tokenizer deepseek``)."""
    return load_tokenizer("deepseek", 0)


class NaturalText:
    """Sentences of common English words (bench/words.txt, drawn uniformly), sized in real tokens of
    ``tokenizer``: about 6.3 characters per DeepSeek token, not the 4 of the pseudo-tokenizer. Each word's
    token count is measured once (with its leading space, capitalised or not); BPE pre-tokenisation splits
    at spaces and punctuation, so the sum is the text's token count to within a token or two."""

    def __init__(self, seed: int = 0, tokenizer: Tokenizer | None = None) -> None:
        self.tok = tokenizer or deepseek()
        lines = (Path(__file__).parent / "words.txt").read_text().splitlines()
        self.words = [w for w in lines if w and not w.startswith("#")]
        self._cost: dict[str, int] = {}
        self.seed = seed

    def _n(self, piece: str) -> int:
        n = self._cost.get(piece)
        if n is None:
            n = self._cost[piece] = len(self.tok.encode(piece))
        return n

    def text(self, rng: random.Random, tokens: int) -> str:
        out: list[str] = []
        n = 0
        start = True
        words = self.words
        while n < tokens:
            w = rng.choice(words)
            if start:
                w = w.capitalize()
                start = False
            r = rng.random()
            if r < 0.045:
                w += "."
                start = True
            elif r < 0.06:
                w += ","
            elif r < 0.062:
                w += "?"
                start = True
            piece = " " + w if out else w
            n += self._n(piece)
            out.append(piece)
        return "".join(out)


def make_text(kind: str, seed: int) -> TextGen | NaturalText:
    if kind == "pseudo":
        return TextGen(seed)
    if kind == "natural":
        return NaturalText(seed)
    raise ValueError(f"text must be 'pseudo' or 'natural', not {kind!r}")


def _tokenizer_for(kind: str) -> Tokenizer:
    return deepseek() if kind == "natural" else PseudoTokenizer()


def burst_arrivals(rng: random.Random, rate: float, duration: float, period: float = 10.0,
                   high: float = 2.0, low: float = 0.5) -> list[float]:
    """Poisson arrivals whose rate alternates ``rate * high`` and ``rate * low`` every ``period`` seconds
    (starting high). Memoryless, so each period is drawn on its own."""
    out: list[float] = []
    t0, k = 0.0, 0
    while t0 < duration:
        r = rate * (high if k % 2 == 0 else low)
        end = min(t0 + period, duration)
        t = t0 + rng.expovariate(r)
        while t < end:
            out.append(t)
            t += rng.expovariate(r)
        t0, k = end, k + 1
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


@dataclass
class StaticWorkload:
    """Every request known in advance (bodies serialised before the run starts)."""

    name: str
    arrivals: list[float]
    planned: list[Planned]
    params: dict[str, object] = field(default_factory=dict)

    async def request(self, k: int) -> Planned:
        return self.planned[k]

    def completed(self, planned: Planned, result: Result) -> None:
        pass


def _chat(messages: list[dict[str, str]], max_tokens: int) -> dict[str, object]:
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


def _dumps(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _system_prompts(gen: TextGen | NaturalText, seed: int, groups: int, tokens: int) -> list[str]:
    out = []
    for g in range(groups):
        rng = random.Random(f"system-{seed}-{g}")
        out.append(f"You are assistant number {g} of the {gen.text(rng, 2)} team. " + gen.text(rng, tokens))
    return out


def shared_prefix(seed: int = 1, rate: float = 14.0, duration: float = 20.0, groups: int = 24,
                  system_tokens: int = 6000, question_tokens: tuple[int, int] = (100, 300),
                  output_tokens: tuple[int, int] = (50, 150), text: str = "pseudo", zipf_s: float = 0.0,
                  bursts: bool = False, burst_period: float = 10.0, name: str = "shared-prefix") -> StaticWorkload:
    """G groups, each a long system prompt, + a unique question. ``zipf_s`` > 0 draws the group from a
    Zipf law (group k with weight 1/(k+1)^s) instead of uniformly; ``bursts`` alternates the rate x2 and
    x0.5 every ``burst_period`` seconds."""
    rng = random.Random(f"shared-prefix-{seed}")
    gen = make_text(text, seed)
    systems = _system_prompts(gen, seed, groups, system_tokens)
    arrivals = (burst_arrivals(rng, rate, duration, burst_period) if bursts
                else poisson_arrivals(rng, rate, duration))
    weights = zipf_weights(groups, zipf_s) if zipf_s > 0 else None
    planned = []
    for i, t in enumerate(arrivals):
        g = rng.choices(range(groups), weights)[0] if weights else rng.randrange(groups)
        q = gen.text(rng, rng.randint(*question_tokens))
        body = _chat([{"role": "system", "content": systems[g]}, {"role": "user", "content": q}],
                     rng.randint(*output_tokens))
        planned.append(Planned(i, t, "chat", _dumps(body), tag=f"g{g}"))
    params: dict[str, object] = dict(
        rate=rate, duration=duration, groups=groups, system_tokens=system_tokens,
        question_tokens=list(question_tokens), output_tokens=list(output_tokens), api="chat (streamed)", text=text)
    if weights:
        params.update(zipf_s=zipf_s, hottest_share=round(weights[0], 3))
    if bursts:
        params.update(bursts=f"rate x2 / x0.5 alternating every {burst_period:g} s")
    return StaticWorkload(name, arrivals, planned, params)


def unique(seed: int = 1, rate: float = 14.0, duration: float = 20.0, prompt_tokens: tuple[int, int] = (1000, 4000),
           output_tokens: tuple[int, int] = (50, 150), text: str = "pseudo", name: str = "unique") -> StaticWorkload:
    rng = random.Random(f"unique-{seed}")
    gen = make_text(text, seed)
    arrivals = poisson_arrivals(rng, rate, duration)
    planned = []
    for i, t in enumerate(arrivals):
        prompt = f"Request {i}: " + gen.text(rng, rng.randint(*prompt_tokens))
        body = _chat([{"role": "user", "content": prompt}], rng.randint(*output_tokens))
        planned.append(Planned(i, t, "chat", _dumps(body), tag="u"))
    return StaticWorkload(name, arrivals, planned, dict(
        rate=rate, duration=duration, prompt_tokens=list(prompt_tokens), output_tokens=list(output_tokens),
        api="chat (streamed)", text=text))


def mixed_apis(seed: int = 1, rate: float = 14.0, duration: float = 20.0, groups: int = 12,
               system_tokens: int = 6000, question_tokens: tuple[int, int] = (100, 300),
               output_tokens: tuple[int, int] = (50, 150), text: str = "pseudo",
               name: str = "mixed-apis") -> StaticWorkload:
    """Shared prefixes, each request through one of the six APIs (uniformly). Chat, Responses and Anthropic
    render the system prompt identically on the pod; completions, generate (the same text as token ids)
    and embeddings share the raw-text form. So each group is two cacheable prefixes on a pod: half the
    groups of ``shared-prefix`` give the same KV working set."""
    rng = random.Random(f"mixed-{seed}")
    gen = make_text(text, seed)
    tok = _tokenizer_for(text)
    systems = _system_prompts(gen, seed + 1000, groups, system_tokens)
    arrivals = poisson_arrivals(rng, rate, duration)
    planned = []
    for i, t in enumerate(arrivals):
        g = rng.randrange(groups)
        api = rng.choice(APIS)
        q = gen.text(rng, rng.randint(*question_tokens))
        n = rng.randint(*output_tokens)
        system, flat = systems[g], systems[g] + "\n\n" + q
        stream = True
        body: dict[str, object]
        if api == "chat":
            body = _chat([{"role": "system", "content": system}, {"role": "user", "content": q}], n)
        elif api == "responses":
            body = {"model": MODEL, "instructions": system, "input": q, "max_output_tokens": n, "stream": True}
        elif api == "messages":
            body = {"model": MODEL, "system": system, "messages": [{"role": "user", "content": q}],
                    "max_tokens": n, "stream": True}
        elif api == "completions":
            body = {"model": MODEL, "prompt": flat, "max_tokens": n, "stream": True,
                    "stream_options": {"include_usage": True}}
        elif api == "generate":
            body = {"model": MODEL, "token_ids": tok.encode(flat), "sampling_params": {"max_tokens": n},
                    "stream": True, "stream_options": {"include_usage": True}}
        else:
            body = {"model": MODEL, "input": flat}
            stream = False
        planned.append(Planned(i, t, api, _dumps(body), stream=stream, tag=f"g{g}"))
    return StaticWorkload(name, arrivals, planned, dict(
        rate=rate, duration=duration, groups=groups, system_tokens=system_tokens,
        question_tokens=list(question_tokens), output_tokens=list(output_tokens), apis=list(APIS), text=text))


@dataclass
class _User:
    lock: asyncio.Lock | None = None
    session: int = 0
    turn: int = 0
    history: list[dict[str, str]] = field(default_factory=list)
    pending_question: str = ""


class MultiTurn:
    """``users`` chat users; arrival k is user k mod users' next turn (so every target sees the same
    conversations). A turn waits for that user's previous answer, which it appends to the history; the wait,
    if any, shows as backlog in the raw data. After ``max_turns`` a user starts a new session. User u joins
    at turn u mod max_turns (earlier turns synthesised, not yet cached anywhere), so conversation depths are
    mixed from the start instead of every user being on turn 1 together.

    ``order="random"`` draws the user of each arrival from a seeded RNG instead (the same draws for every
    target): with ``k mod users`` and a user count that is a multiple of the pod count, a strict round robin
    sends every user to the same pod every time, which is stickiness by accident, not routing."""

    name = "multi-turn"

    def __init__(self, seed: int = 1, rate: float = 14.0, duration: float = 20.0, users: int = 48,
                 groups: int = 4, system_tokens: int = 2000, question_tokens: tuple[int, int] = (400, 1000),
                 output_tokens: tuple[int, int] = (50, 150), max_turns: int = 10, text: str = "pseudo",
                 name: str = "multi-turn", order: str = "cyclic") -> None:
        self.name = name
        self.seed = seed
        rng = random.Random(f"multi-turn-{seed}")
        self.arrivals = poisson_arrivals(rng, rate, duration)
        if order not in ("cyclic", "random"):
            raise ValueError(f"order must be 'cyclic' or 'random', not {order!r}")
        pick = random.Random(f"multi-turn-users-{seed}")
        self.user_of = [k % users if order == "cyclic" else pick.randrange(users) for k in range(len(self.arrivals))]
        self.gen = make_text(text, seed)
        self.systems = _system_prompts(self.gen, seed + 2000, groups, system_tokens)
        self.users = [_User() for _ in range(users)]
        self.question_tokens = question_tokens
        self.output_tokens = output_tokens
        self.max_turns = max_turns
        self.params: dict[str, object] = dict(
            rate=rate, duration=duration, users=users, groups=groups, system_tokens=system_tokens,
            question_tokens=list(question_tokens), output_tokens=list(output_tokens), max_turns=max_turns,
            api="chat (streamed)", text=text, order=order)

    async def request(self, k: int) -> Planned:
        u_idx = self.user_of[k]
        u = self.users[u_idx]
        if u.lock is None:
            u.lock = asyncio.Lock()
        await u.lock.acquire()
        if u.turn == 0:
            u.history = [{"role": "system", "content": self.systems[u_idx % len(self.systems)]}]
            if u.session == 0:  # steady state from the start: users join mid-conversation, at every depth
                for t in range(u_idx % self.max_turns):
                    rng = random.Random(f"past-{self.seed}-{u_idx}-{t}")
                    u.history += [
                        {"role": "user", "content": f"Question {t + 1}: "
                         + self.gen.text(rng, rng.randint(*self.question_tokens))},
                        {"role": "assistant", "content": self.gen.text(rng, rng.randint(*self.output_tokens))}]
                    u.turn += 1
        rng = random.Random(f"turn-{self.seed}-{u_idx}-{u.session}-{u.turn}")
        u.pending_question = f"Question {u.turn + 1}: " + self.gen.text(rng, rng.randint(*self.question_tokens))
        body = _chat([*u.history, {"role": "user", "content": u.pending_question}], rng.randint(*self.output_tokens))
        return Planned(k, self.arrivals[k], "chat", _dumps(body), tag=f"u{u_idx}.s{u.session}.t{u.turn}",
                       keep_text=True)

    def completed(self, planned: Planned, result: Result) -> None:
        u = self.users[self.user_of[planned.i]]
        if result.ok and result.text:
            u.history += [{"role": "user", "content": u.pending_question},
                          {"role": "assistant", "content": result.text}]
            u.turn += 1
        else:
            u.turn = self.max_turns  # a failed turn ends the conversation
        if u.turn >= self.max_turns:
            u.turn, u.session, u.history = 0, u.session + 1, []
        assert u.lock is not None
        u.lock.release()


WORKLOADS = ("shared-prefix", "multi-turn", "unique", "mixed-apis")
_FACTORIES = {"shared-prefix": shared_prefix, "multi-turn": MultiTurn, "unique": unique, "mixed-apis": mixed_apis}


@dataclass(frozen=True)
class SuiteWorkload:
    """One workload of a suite: a builder, its sizes and rate, and the pod settings it runs on."""

    name: str
    kind: str  # a key of _FACTORIES
    rate: float
    kw: dict[str, object]
    num_gpu_blocks: int = 2048
    max_num_seqs: int = 256
    duration: float | None = None  # seconds of arrivals, if not the suite's
    why: str = ""


# The outside evaluation's regimes (bench/README.md, "pressure suite"): 8 pods of the `pressure` profile,
# DeepSeek tokenizer, natural text. Sizes are DeepSeek tokens.
_SP = dict(system_tokens=3000, question_tokens=(150, 150), output_tokens=(100, 100), text="natural")
PRESSURE: tuple[SuiteWorkload, ...] = (
    SuiteWorkload("p-shared-prefix", "shared-prefix", 20.0, dict(groups=16, **_SP),
                  why="16 x 3k-token prefixes = 48k tokens; a pod holds 32k: round robin thrashes every pod"),
    SuiteWorkload("p-zipf", "shared-prefix", 30.0, dict(groups=32, zipf_s=1.1, **_SP),
                  why="one prefix takes 28% of requests: affinity alone piles them on one pod"),
    SuiteWorkload("p-zipf-uncapped", "shared-prefix", 24.0,
                  dict(groups=32, zipf_s=1.1, **{**_SP, "output_tokens": (200, 200)}),
                  why="p-zipf-capped without the cap: the hot pod can batch its way out"),
    SuiteWorkload("p-bursts", "shared-prefix", 20.0, dict(groups=16, bursts=True, **_SP), duration=25.0,
                  why="40 req/s for 10 s then 10 req/s: queues build, then must drain"),
    SuiteWorkload("p-unique", "unique", 20.0,
                  dict(prompt_tokens=(500, 2000), output_tokens=(100, 100), text="natural"),
                  why="nothing to reuse: load balancing alone, round robin is the bar"),
    SuiteWorkload("p-multi-turn", "multi-turn", 20.0,
                  dict(users=48, groups=1, system_tokens=1000, question_tokens=(150, 150),
                       output_tokens=(100, 100), max_turns=10, text="natural", order="random"),
                  why="48 growing histories (1k-3.5k tokens): a moved turn re-prefills its history"),
    SuiteWorkload("p-multi-turn-long", "multi-turn", 10.0,
                  dict(users=48, groups=4, system_tokens=2000, question_tokens=(400, 1000),
                       output_tokens=(50, 150), max_turns=10, text="natural", order="random"),
                  why="the default suite's long sessions: histories outgrow the cluster's KV"),
    SuiteWorkload("p-mixed-apis", "mixed-apis", 20.0, dict(groups=16, **_SP),
                  why="the same prefixes through six APIs: a router must see chat = Responses = Anthropic"),
    SuiteWorkload("p-shared-prefix-smallkv", "shared-prefix", 20.0, dict(groups=16, **_SP), num_gpu_blocks=1024,
                  why="KV 1,024 blocks: a pod holds a third of the prefixes; misplacement evicts"),
    SuiteWorkload("p-zipf-capped", "shared-prefix", 24.0,
                  dict(groups=32, zipf_s=1.1, **{**_SP, "output_tokens": (200, 200)}), max_num_seqs=16,
                  why="max_num_seqs 16: the hottest prefix alone overloads one pod; it must spill"),
)
SUITES: dict[str, tuple[SuiteWorkload, ...]] = {"pressure": PRESSURE}


def build(name: str, seed: int, rate: float, duration: float, **kw: object):
    """A workload by name: one of WORKLOADS, or a suite workload (its own rate and sizes; ``kw`` overrides)."""
    for spec in (w for suite in SUITES.values() for w in suite):
        if spec.name == name:
            return _FACTORIES[spec.kind](seed=seed, rate=rate, duration=duration,  # type: ignore[operator]
                                         **{**spec.kw, **kw, "name": name})
    return _FACTORIES[name](seed=seed, rate=rate, duration=duration, **kw)  # type: ignore[operator]
