"""Profile handlers: which scheduling profiles run, and which result routes the request."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epp.plugin import InferenceRequest, ProfileHandler, ProfileResult, SchedulingResult, register_plugin


@register_plugin("single-profile-handler")
class SingleProfileHandler(ProfileHandler):
    """Runs the only profile once; its result is primary."""

    def pick_profiles(self, request: InferenceRequest, profiles: Mapping[str, Any],
                      results: Mapping[str, ProfileResult | None]) -> dict[str, Any]:
        return {} if results else dict(profiles)

    def process_results(self, request: InferenceRequest,
                        results: dict[str, ProfileResult | None]) -> SchedulingResult:
        if len(results) != 1:
            raise ValueError(f"single-profile-handler expects one profile, got {len(results)}")
        (name,) = results
        return SchedulingResult(results, name)
