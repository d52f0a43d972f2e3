"""How many characters of a prompt make one token, learned per model from what the servers report.

EPP sees prompt text; the model servers count tokens. Any fixed ratio is wrong somewhere (4 characters per
token holds for some English with a 32k vocabulary; common words with a large vocabulary run about 7; code
and CJK far fewer), and every estimate built on it -- the load a request adds, the tokens a prefix match
saves, whether a reported ``cached_tokens`` means a hit or an eviction -- inherits the error. So the ratio
is learned: each completed response that reports ``prompt_tokens`` adds (characters EPP rendered, tokens
the server counted) to a per-model sum that forgets slowly (older samples weigh less), starting from a
prior of ``DEFAULT_CHARS_PER_TOKEN`` worth ``PRIOR_TOKENS`` tokens so that one odd response cannot swing it.
The ratio includes what the server's chat template adds, which is what converting EPP's text to the
server's counts needs.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_CHARS_PER_TOKEN = 4.0  # the prior (GIE's estimate), until responses say otherwise
PRIOR_TOKENS = 512.0
DECAY = 0.98  # per sample: the last ~50 responses carry most of the weight
MAX_MODELS = 256  # models remembered; the least recently used is forgotten
_BOUNDS = (0.5, 32.0)  # a sample outside these characters per token is a mismatch (e.g. media), not a ratio


class TokenRatios:
    __slots__ = ("_models",)

    def __init__(self) -> None:
        self._models: OrderedDict[str, list[float]] = OrderedDict()  # model -> [chars, tokens, samples]

    def chars_per_token(self, model: str) -> float:
        sums = self._models.get(model)
        return DEFAULT_CHARS_PER_TOKEN if sums is None else sums[0] / sums[1]

    def tokens(self, model: str, chars: int) -> int:
        """The server's token count for ``chars`` characters of prompt text, as learned so far."""
        return int(chars / self.chars_per_token(model))

    def observe(self, model: str, chars: int, tokens: int) -> None:
        if chars <= 0 or tokens <= 0 or not _BOUNDS[0] <= chars / tokens <= _BOUNDS[1]:
            return
        sums = self._models.get(model)
        if sums is None:
            sums = self._models[model] = [DEFAULT_CHARS_PER_TOKEN * PRIOR_TOKENS, PRIOR_TOKENS, 0.0]
            while len(self._models) > MAX_MODELS:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model)
        sums[0] = sums[0] * DECAY + chars
        sums[1] = sums[1] * DECAY + tokens
        sums[2] += 1

    def samples(self, model: str) -> int:
        sums = self._models.get(model)
        return 0 if sums is None else int(sums[2])

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {m: {"chars_per_token": round(s[0] / s[1], 3), "samples": int(s[2])}
                for m, s in list(self._models.items())}
