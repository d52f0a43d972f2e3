"""Token ids of a request, as the engine computes them.

``LocalTokenizer``: a model directory's ``tokenizer.json`` (HF ``tokenizers``) and ``tokenizer_config.json``
(``chat_template``, special tokens). Chat-like requests are rendered with the model's template and encoded
without special tokens (the template writes them); completions prompts are encoded with them (the tokenizer's
post-processor adds BOS), as vLLM does.

Caching in tokens: the rendered prompt is cut at special tokens (which never merge with their neighbours) and,
inside long stretches of text, after newlines that start a line (only when the tokenizer provably does not merge
across them: a probe at load time). Each long piece's ids are kept in an LRU bounded by characters, so a shared
8k-token system prompt or a conversation's earlier turns are tokenized once. ``head`` encodes only the start of
a piece (cut before a word, where tokens provably never merge: a probe at load time), for text no endpoint can
match past its first block (``PrecisePrefixCacheProducer._partial``).

``PodRenderer``: for models without a local tokenizer, asks a pod -- vLLM's ``/v1/chat/completions/render``
and ``/v1/completions/render``, else ``/tokenize`` -- with a timeout and an LRU of answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from epp.api.types import ApiKind, InferenceRequest
from epp_plugins.scorers.precise.chat import NotRenderable, chat_messages, render

log = logging.getLogger(__name__)

MIN_CACHED_CHARS = 256  # shorter pieces are cheaper to tokenize than to look up
CHUNK_CHARS = 8192  # long text is cut into about this much (at line starts) for the cache
LEARNED_TOKENS = 1000  # tokens encoded before the learned characters per token estimates untokenized text
HEAD_SEARCH_CHARS = 256  # how far past the wanted length ``head`` looks for a cut
_SPECIAL_VARS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TokenCache:
    """Token ids of text pieces, least recently used out first, bounded by the characters held."""

    def __init__(self, max_chars: int = 64 << 20) -> None:
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0
        self.max_chars = max_chars
        self.hits = self.misses = 0

    def get(self, text: str) -> list[int] | None:
        ids = self._ids.get(text)
        if ids is not None:
            self._ids.move_to_end(text)
            self.hits += 1
        return ids

    def __contains__(self, text: str) -> bool:  # no LRU touch: asking is not using
        return text in self._ids

    def put(self, text: str, ids: list[int]) -> None:
        self.misses += 1
        if text not in self._ids:
            self._chars += len(text)
        self._ids[text] = ids
        while self._chars > self.max_chars and self._ids:
            self._chars -= len(self._ids.popitem(last=False)[0])


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_splitter(specials: list[str]) -> Callable[[str], list[str]] | None:
    """``re.split`` on the special tokens (longest first at each position): text pieces at even indexes, tokens
    at odd ones. A model's added tokens can number over a thousand (DeepSeek's), and a regex alternating them
    costs ~0.25 ms per 18k characters of prompt, on every request; when every token starts with a character
    that is rare in text (``<``, ``[``), scanning for those characters with ``str.find`` gives the same
    pieces in a few microseconds. Tokens starting with a letter, digit or space keep the regex."""
    if not specials:
        return None
    ordered = sorted(specials, key=len, reverse=True)
    if any(s[0].isalnum() or s[0].isspace() for s in ordered):
        return re.compile("(" + "|".join(map(re.escape, ordered)) + ")").split
    # first character -> (length, tokens of that length), longest first: one slice and set lookup per length
    sizes: dict[str, dict[int, set[str]]] = {}
    for s in ordered:
        sizes.setdefault(s[0], {}).setdefault(len(s), set()).add(s)
    by_first = {c: sorted(by_len.items(), reverse=True) for c, by_len in sizes.items()}

    def split(text: str) -> list[str]:
        out: list[str] = []
        start = 0
        nxt = {c: text.find(c) for c in by_first}
        while True:
            p, c = min(((q, c) for c, q in nxt.items() if q >= 0), default=(-1, ""))
            if p < 0:
                break
            for n, tokens in by_first[c]:
                s = text[p:p + n]
                if s in tokens:
                    out += (text[start:p], s)
                    start = p + n
                    break
            resume = max(start, p + 1)
            for ch, q in nxt.items():
                if 0 <= q < resume:
                    nxt[ch] = text.find(ch, resume)
        out.append(text[start:])
        return out

    return split


class LocalTokenizer:
    def __init__(self, path: str, chat_template: str | None = None, cache_chars: int = 64 << 20) -> None:
        from tokenizers import AddedToken, Tokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"tokenizer: cannot load {file!r}: {e}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self._fast = getattr(self._tok, "encode_batch_fast", None)
        config: dict[str, Any] = {}
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if chat_template is not None and os.path.exists(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                template = f.read()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.special: dict[str, Any] = {k: _token_text(config.get(k)) for k in _SPECIAL_VARS}
        extra = [t for t in (_token_text(x) for x in config.get("additional_special_tokens") or []) if t]
        self.special["additional_special_tokens"] = extra
        for entry in (config.get("added_tokens_decoder") or {}).values():
            t = _token_text(entry)
            if t and entry.get("special"):
                extra.append(t)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [t for t in dict.fromkeys(extra) if t not in vocab]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        specials = sorted({t.content for t in self._tok.get_added_tokens_decoder().values()}, key=len, reverse=True)
        self._split = special_splitter(specials)
        self._special_ids = {t: self._tok.token_to_id(t) for t in specials}
        self._prefix = self._tok.encode("", add_special_tokens=True).ids  # what the post-processor adds (BOS)
        self.cache = TokenCache(cache_chars)
        self._line_cuts = self._probe_line_cuts()
        self._word_cuts = self._probe_word_cuts()
        self.encoded_chars = self.encoded_tokens = 0  # what the cache was filled with: chars per token, learned
        self.path = file

    def _probe_line_cuts(self) -> bool:
        """Whether cutting text after a newline that starts a line tokenizes exactly as the whole."""
        for a, b in (("Hello world.\n", "Next line"), ("x = 1\n", "y = 2\n"), ("  indented\n", "- item"),
                     ("end\n", "\u4e2d\u6587 text"), ("a b c\n", "123 456")):
            if self._encode(a + b) != self._encode(a) + self._encode(b):
                return False
        return True

    def _probe_word_cuts(self) -> bool:
        """Whether cutting text before a space between two letters tokenizes exactly as the whole (a
        pre-tokenizer that splits words off, as every BPE one does): what ``head`` relies on."""
        for a, b in (("Hello world", " again"), ("The cat", " sat down."), ("na\u00efve caf\u00e9", " cr\u00e8me"),
                     ("one two", " three four"), ("\u6570\u636e", " analysis"), ("don't", " stop")):
            if self._encode(a + b) != self._encode(a) + self._encode(b):
                return False
        return True

    def _encode(self, text: str) -> list[int]:
        return self.encode_texts([text])[0]

    def _cached(self, text: str) -> list[int]:
        if len(text) < MIN_CACHED_CHARS:
            return self._encode(text)
        ids = self.cache.get(text)
        if ids is None:
            ids = self._encode(text)
            self.cache.put(text, ids)
            self._learn(len(text), len(ids))
        return ids

    def _learn(self, chars: int, tokens: int) -> None:
        self.encoded_chars += chars
        self.encoded_tokens += tokens

    def chars_per_token(self) -> float | None:
        """Characters per token over the text encoded into the cache; None before ``LEARNED_TOKENS``."""
        return self.encoded_chars / self.encoded_tokens if self.encoded_tokens >= LEARNED_TOKENS else None

    def first_unknown(self, pieces: list[str | int]) -> int | None:
        """Index of the first piece the cache would keep but does not hold, None when there is none."""
        for i, p in enumerate(pieces):
            if isinstance(p, str) and len(p) >= MIN_CACHED_CHARS and p not in self.cache:
                return i
        return None

    def head(self, text: str, chars: int) -> tuple[list[int], int] | None:
        """(ids, cut): the exact leading token ids of ``text`` -- those of ``text[:cut]`` for the first cut
        before a space between two letters at or after ``chars`` (a pre-token boundary: tokens never span it) --
        or None when the tokenizer merges across such cuts or none lies within the first half of the text."""
        if not self._word_cuts:
            return None
        limit = min(len(text) // 2, chars + HEAD_SEARCH_CHARS)
        p = text.find(" ", max(1, chars))
        while 0 < p < limit:
            if text[p - 1].isalpha() and text[p + 1].isalpha():
                return self._encode(text[:p]), p
            p = text.find(" ", p + 1)
        return None

    def _chunks(self, text: str, out: list[str | int]) -> None:
        """Long text cut into about ``CHUNK_CHARS`` (just after a newline that starts a line), for the cache."""
        if len(text) <= CHUNK_CHARS or not self._line_cuts:
            out.append(text)
            return
        start = 0
        n = len(text)
        while start < n:
            end = min(n, start + CHUNK_CHARS)
            while end < n:  # extend to just after a newline followed by a non-space character
                nl = text.find("\n", end - 1)
                if nl < 0 or nl + 1 >= n:
                    end = n
                    break
                if not text[nl + 1].isspace():
                    end = nl + 1
                    break
                end = nl + 2
            out.append(text[start:end])
            start = end

    def pieces(self, text: str) -> list[str | int]:
        """The text as ``encode`` cuts it: special-token ids, and text pieces each encoded on its own."""
        out: list[str | int] = []
        if self._split is None:
            self._chunks(text, out)
            return out
        ids = self._special_ids
        for i, piece in enumerate(self._split(text)):
            if i % 2:
                out.append(ids[piece])
            elif piece:
                self._chunks(piece, out)
        return out

    def missing(self, pieces: list[str | int]) -> list[str]:
        """The pieces the cache would keep but does not hold yet."""
        return [p for p in pieces if isinstance(p, str) and len(p) >= MIN_CACHED_CHARS and p not in self.cache]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, touching nothing else: safe on a worker thread (the tokenizer releases the
        GIL while it encodes). encode_batch_fast skips the offsets (same ids, ~40% less time); tokenizers before
        0.20 lack it."""
        if self._fast is not None:
            return [e.ids for e in self._fast(texts, add_special_tokens=False)]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def remember(self, texts: list[str], ids: list[list[int]]) -> None:
        for text, token_ids in zip(texts, ids, strict=True):
            self.cache.put(text, token_ids)
            self._learn(len(text), len(token_ids))

    def assemble(self, pieces: list[str | int], add_special_tokens: bool) -> list[int]:
        out: list[int] = list(self._prefix) if add_special_tokens else []
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                out += self._cached(piece)
        return out

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.assemble(self.pieces(text), add_special_tokens)

    def prompt(self, request: InferenceRequest) -> tuple[str, bool] | None:
        """The text the engine tokenizes for this request and whether it adds special tokens (BOS) itself, or
        None when this request cannot be rendered here (or carries token ids)."""
        body = request.body
        if body.prompt_token_ids is not None:
            return None
        try:
            chat = chat_messages(body)
        except NotRenderable:
            return None
        if chat is not None:
            if self.chat_template is None:
                return None
            messages, variables = chat
            try:
                return render(self.chat_template, messages, variables, self.special), False
            except NotRenderable as e:
                log.debug("chat template: %s", e)
                return None
        if body.api == ApiKind.COMPLETIONS and isinstance(body.prompt_text, str):
            return body.prompt_text, True
        return None

    def request_tokens(self, request: InferenceRequest) -> list[int] | None:
        """The prompt's token ids, or None when this request cannot be tokenized here."""
        if request.body.prompt_token_ids is not None:
            return request.body.prompt_token_ids
        found = self.prompt(request)
        return None if found is None else self.encode(*found)


class PodRenderer:
    """Token ids from a pod's own renderer, cached by request content; a failed or slow pod yields None."""

    def __init__(self, timeout: float = 2.0, cache_size: int = 4096) -> None:
        self.timeout = timeout
        self._cache: OrderedDict[bytes, list[int]] = OrderedDict()
        self._size = cache_size
        self._session: Any = None
        self._no_render: set[str] = set()  # pods that answered 404 to the render endpoints
        self.failures = 0

    def _query(self, request: InferenceRequest) -> tuple[str, dict[str, Any]] | None:
        body = request.body
        try:
            chat = chat_messages(body)
        except NotRenderable:
            return None
        model = request.target_model or body.model
        if chat is not None:
            messages, variables = chat
            doc: dict[str, Any] = {"model": model, "messages": messages,
                                   "add_generation_prompt": variables.pop("add_generation_prompt", True)}
            if "tools" in variables:
                doc["tools"] = variables.pop("tools")
            if variables:
                doc["chat_template_kwargs"] = variables
            return "chat", doc
        if body.api == ApiKind.COMPLETIONS and isinstance(body.prompt_text, str):
            return "completions", {"model": model, "prompt": body.prompt_text}
        return None

    def cached(self, request: InferenceRequest) -> tuple[bytes, tuple[str, dict[str, Any]]] | list[int] | None:
        query = self._query(request)
        if query is None:
            return None
        key = hashlib.blake2b(json.dumps(query, sort_keys=True).encode(), digest_size=16).digest()
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            return ids
        return key, query

    async def render(self, base_url: str, key: bytes, query: tuple[str, dict[str, Any]]) -> list[int] | None:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        kind, doc = query
        paths = [] if base_url in self._no_render else \
            ["/v1/chat/completions/render" if kind == "chat" else "/v1/completions/render"]
        paths.append("/tokenize")
        for path in paths:
            body = doc if path != "/tokenize" or kind == "chat" else {**doc, "add_special_tokens": True}
            if path == "/tokenize" and kind == "chat":
                body = {**doc, "add_special_tokens": False}
            try:
                async with self._session.post(base_url + path, json=body) as resp:
                    if resp.status == 404 and path != "/tokenize":
                        self._no_render.add(base_url)
                        continue
                    if resp.status != 200:
                        break
                    out = await resp.json()
            except (TimeoutError, aiohttp.ClientError, ValueError):
                break
            ids = _ids_of(out)
            if ids is not None:
                self._cache[key] = ids
                while len(self._cache) > self._size:
                    self._cache.popitem(last=False)
                return ids
        self.failures += 1
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _ids_of(doc: Any) -> list[int] | None:
    """``/tokenize``: ``{"tokens": [...]}``; render: ``{"token_ids": [...]}`` or a list of those."""
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, dict):
        return None
    ids = doc.get("token_ids", doc.get("tokens"))
    if isinstance(ids, list) and all(type(t) is int for t in ids):
        return ids
    return None
