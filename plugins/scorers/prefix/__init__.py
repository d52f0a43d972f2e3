"""Approximate prefix-cache affinity: send a prompt where its prefix was sent before.

Two plugins, as in GIE:

* ``approx-prefix-cache-producer`` (``producer``) hashes the prompt into blocks, matches the blocks against a
  per-endpoint index of what EPP sent there (``index``), updates the index when a pick is made and corrects it
  from the ``cached_tokens`` the model server reports.
* ``prefix-cache-scorer`` (``scorer``) turns the match into a score. Without a configured producer it builds its
  own from the same parameters (so ``prefix-cache-scorer: {blockSizeTokens: 32}`` works as our README and older
  GIE docs show); with one, it uses that producer (``prefixMatchInfoProducerName`` picks among several) and the
  producer parameters belong on the producer.

``tokenizer`` turns prompt text into the ids blocks are cut from when a tokenizer is configured; ``resolve``
finds, for the other plugins reading a prefix match (affinity filter, no-hit-lru, token-load, latency,
disaggregation), the plugin to read it from. Importing this package registers both plugin types.
"""

from epp_plugins.scorers.prefix.index import PrefixState
from epp_plugins.scorers.prefix.producer import ApproxPrefixCacheProducer
from epp_plugins.scorers.prefix.resolve import PrefixSource, resolve_prefix_source
from epp_plugins.scorers.prefix.scorer import PrefixCacheScorer
from epp_plugins.scorers.prefix.tokenizer import ChunkedTokenizer

__all__ = ["ApproxPrefixCacheProducer", "ChunkedTokenizer", "PrefixCacheScorer", "PrefixSource", "PrefixState",
           "resolve_prefix_source"]
