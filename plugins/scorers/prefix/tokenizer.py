"""Token ids for prompt text without the model server: an optional HF tokenizer applied in cached chunks, and
GIE's characters-per-token estimate the producer falls back on (blocks of ``4 * B`` characters) without one."""

from __future__ import annotations

from array import array
from collections import OrderedDict

CHARS_PER_TOKEN = 4  # GIE's estimate when hashing characters


class ChunkedTokenizer:
    """A HF ``tokenizer.json`` applied to fixed 512-character chunks of the prompt, with an LRU of chunk ->
    token ids. Tokenizing a 30 KB prompt costs tens of milliseconds; prompts that share a prefix share
    its chunks, so only the new tail is tokenized. Chunk boundaries shift a token here and there compared
    with tokenizing the whole text; the result is still deterministic and prefix-stable, which is all
    block hashing needs."""

    CHUNK_CHARS = 512

    def __init__(self, path: str, cache_chunks: int = 16384) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ValueError(f"tokenizer: the 'tokenizers' package is not installed ({e})") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"tokenizer: cannot load {path!r}: {e}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = path
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cap = cache_chunks

    def encode(self, text: str, max_tokens: int) -> tuple[bytes, int]:
        """Little-endian uint32 token ids of the first ``max_tokens`` tokens, and an estimate of the
        whole text's token count."""
        chunk = self.CHUNK_CHARS
        cache = self._cache
        parts: list[bytes] = []
        n = 0
        pos = 0
        size = len(text)
        while pos < size and n < max_tokens:
            want = max((max_tokens - n) * CHARS_PER_TOKEN, chunk)
            end = min(size, pos + -(-want // chunk) * chunk)
            chunks = [text[j: j + chunk] for j in range(pos, end, chunk)]
            missing = list(dict.fromkeys(c for c in chunks if c not in cache))
            if missing:
                for c, enc in zip(missing, self._tok.encode_batch(missing, add_special_tokens=False), strict=True):
                    cache[c] = array("I", enc.ids).tobytes()
            for c in chunks:
                ids = cache[c]
                cache.move_to_end(c)
                parts.append(ids)
                n += len(ids) // 4
                pos += len(c)
                if n >= max_tokens:
                    break
            while len(cache) > self._cap:
                cache.popitem(last=False)
        data = b"".join(parts)
        total = n if pos >= size else n + int((size - pos) * n / max(pos, 1))
        return data[: max_tokens * 4], total
