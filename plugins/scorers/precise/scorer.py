"""``precise-prefix-cache-scorer``: llm-d's older single-plugin form, a ``prefix-cache-scorer`` over its own
``precise-prefix-cache-producer`` (every producer parameter is accepted here and passed on)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.scheduling.plugins import RequestPreparer
from epp.scheduling.registry import register_plugin
from epp_plugins.scorers.precise.producer import PrecisePrefixCacheProducer
from epp_plugins.scorers.prefix import PrefixCacheScorer


@register_plugin("precise-prefix-cache-scorer")
class PrecisePrefixCacheScorer(PrefixCacheScorer, RequestPreparer):
    def __init__(self, score_mode: str | None = None, match_length_scale_tokens: int | None = None,
                 match_length_weight: float | None = None, **producer: Any) -> None:
        super().__init__(score_mode=score_mode, match_length_scale_tokens=match_length_scale_tokens,
                         match_length_weight=match_length_weight)
        self._own = PrecisePrefixCacheProducer(**producer)
        self.producer = self._own
        self.prepares = self._own.prepares

    def start(self) -> None:
        self._own.name = f"{self.name}/producer"
        self._own.handle = self.handle
        self._own.start()

    async def prepare_request(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        await self._own.prepare_request(request, endpoints)

    def metric_families(self) -> Any:
        return self._own.metric_families()

    def debug_state(self) -> dict[str, object]:
        return self._own.debug_state()
