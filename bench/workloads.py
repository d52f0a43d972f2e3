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
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass, field

from bench.client import Planned, Result
from sim.tokenizer import PseudoTokenizer

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


def _system_prompts(gen: TextGen, seed: int, groups: int, tokens: int) -> list[str]:
    out = []
    for g in range(groups):
        rng = random.Random(f"system-{seed}-{g}")
        out.append(f"You are assistant number {g} of the {gen.text(rng, 2)} team. " + gen.text(rng, tokens))
    return out


def shared_prefix(seed: int = 1, rate: float = 14.0, duration: float = 20.0, groups: int = 24,
                  system_tokens: int = 6000, question_tokens: tuple[int, int] = (100, 300),
                  output_tokens: tuple[int, int] = (50, 150)) -> StaticWorkload:
    rng = random.Random(f"shared-prefix-{seed}")
    gen = TextGen(seed)
    systems = _system_prompts(gen, seed, groups, system_tokens)
    arrivals = poisson_arrivals(rng, rate, duration)
    planned = []
    for i, t in enumerate(arrivals):
        g = rng.randrange(groups)
        q = gen.text(rng, rng.randint(*question_tokens))
        body = _chat([{"role": "system", "content": systems[g]}, {"role": "user", "content": q}],
                     rng.randint(*output_tokens))
        planned.append(Planned(i, t, "chat", _dumps(body), tag=f"g{g}"))
    return StaticWorkload("shared-prefix", arrivals, planned, dict(
        rate=rate, duration=duration, groups=groups, system_tokens=system_tokens,
        question_tokens=list(question_tokens), output_tokens=list(output_tokens), api="chat (streamed)"))


def unique(seed: int = 1, rate: float = 14.0, duration: float = 20.0, prompt_tokens: tuple[int, int] = (1000, 4000),
           output_tokens: tuple[int, int] = (50, 150)) -> StaticWorkload:
    rng = random.Random(f"unique-{seed}")
    gen = TextGen(seed)
    arrivals = poisson_arrivals(rng, rate, duration)
    planned = []
    for i, t in enumerate(arrivals):
        text = f"Request {i}: " + gen.text(rng, rng.randint(*prompt_tokens))
        body = _chat([{"role": "user", "content": text}], rng.randint(*output_tokens))
        planned.append(Planned(i, t, "chat", _dumps(body), tag="u"))
    return StaticWorkload("unique", arrivals, planned, dict(
        rate=rate, duration=duration, prompt_tokens=list(prompt_tokens), output_tokens=list(output_tokens),
        api="chat (streamed)"))


def mixed_apis(seed: int = 1, rate: float = 14.0, duration: float = 20.0, groups: int = 12,
               system_tokens: int = 6000, question_tokens: tuple[int, int] = (100, 300),
               output_tokens: tuple[int, int] = (50, 150)) -> StaticWorkload:
    """Shared prefixes, each request through one of the six APIs (uniformly). Chat, Responses and Anthropic
    render the system prompt identically on the pod; completions, generate (the same text as token ids)
    and embeddings share the raw-text form. So each group is two cacheable prefixes on a pod: half the
    groups of ``shared-prefix`` give the same KV working set."""
    rng = random.Random(f"mixed-{seed}")
    gen = TextGen(seed)
    tok = PseudoTokenizer()
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
    return StaticWorkload("mixed-apis", arrivals, planned, dict(
        rate=rate, duration=duration, groups=groups, system_tokens=system_tokens,
        question_tokens=list(question_tokens), output_tokens=list(output_tokens), apis=list(APIS)))


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
    mixed from the start instead of every user being on turn 1 together."""

    name = "multi-turn"

    def __init__(self, seed: int = 1, rate: float = 14.0, duration: float = 20.0, users: int = 48,
                 groups: int = 4, system_tokens: int = 2000, question_tokens: tuple[int, int] = (400, 1000),
                 output_tokens: tuple[int, int] = (50, 150), max_turns: int = 10) -> None:
        self.seed = seed
        rng = random.Random(f"multi-turn-{seed}")
        self.arrivals = poisson_arrivals(rng, rate, duration)
        self.gen = TextGen(seed)
        self.systems = _system_prompts(self.gen, seed + 2000, groups, system_tokens)
        self.users = [_User() for _ in range(users)]
        self.question_tokens = question_tokens
        self.output_tokens = output_tokens
        self.max_turns = max_turns
        self.params: dict[str, object] = dict(
            rate=rate, duration=duration, users=users, groups=groups, system_tokens=system_tokens,
            question_tokens=list(question_tokens), output_tokens=list(output_tokens), max_turns=max_turns,
            api="chat (streamed)")

    async def request(self, k: int) -> Planned:
        u_idx = k % len(self.users)
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
        u = self.users[planned.i % len(self.users)]
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


def build(name: str, seed: int, rate: float, duration: float, **kw: object):
    factory = {"shared-prefix": shared_prefix, "multi-turn": MultiTurn, "unique": unique,
               "mixed-apis": mixed_apis}[name]
    return factory(seed=seed, rate=rate, duration=duration, **kw)  # type: ignore[arg-type]
