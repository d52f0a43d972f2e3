"""Prefill/decode disaggregation, wired the way llm-d and vLLM's NIXL connector wire it.

The request always goes to a **decode** pod. When a prefill pod should compute the prompt, EPP adds
``x-prefiller-host-port: <prefill ip:port>``; the decode pod's sidecar then sends the request to that pod with
``kv_transfer_params: {"do_remote_decode": true}`` and ``max_tokens: 1``, pulls the KV blocks it answers with,
and decodes. Pods say what they are with the label ``llm-d.ai/role`` (``prefill-filter`` / ``decode-filter``,
plugins/filters/labels.py).

* ``disagg-profile-handler`` (llm-d's names and parameters): runs the decode profile; then, when the prefill
  decider approves for the decode pod it chose, the prefill profile. The decode pick is primary; a prefill
  pick sets the header. No prefill pod (none labelled, none answering) or no approval -> the decode pod
  serves alone.
* ``prefix-based-pd-decider``: split when the prompt tokens the chosen decode pod does not hold reach
  ``nonCachedTokens`` (0, llm-d's default, never splits) and the prompt has ``promptTokens``. EPP also weighs
  the KV transfer: moving ``n`` uncached tokens off the decode pod saves ``n`` tokens of prefill there but
  costs a second request and the pull, ``kvTransferFixedTokens + kvTransferTokenCost * n`` in prefill-token
  equivalents; the split must save more than it costs, so a short prompt is never split whatever
  ``nonCachedTokens`` says.
* ``always-disagg-pd-decider``: split every request (there is still no split without a prefill pod).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from epp.api.types import InferenceRequest
from epp.datalayer.endpoint import Endpoint
from epp.extproc.protocol import PREFILLER_HEADER
from epp.scheduling.plugins import Plugin, ProfileHandler, ProfileResult, SchedulingResult
from epp.scheduling.registry import PluginConfigError, register_plugin
from epp_plugins.scorers.common import check_float, check_int, check_mapping, check_str
from epp_plugins.scorers.prefix import resolve_prefix_source

DECODE_ONLY = "decode-only"
PREFILL_DECODE = "prefill-decode"  # llm-d's decision_type values
# KV transfer cost, in tokens of prefill it is worth: a second HTTP round trip and a one-token prefill request
# (~256 tokens of prefill), and pulling a token's KV over RDMA (~5 us for an 8B model) against computing it
# (~100 us on the same GPU).
DEFAULT_TRANSFER_FIXED_TOKENS = 256
DEFAULT_TRANSFER_TOKEN_COST = 0.05


@dataclass(slots=True)
class Verdict:
    split: bool
    reason: str
    prompt_tokens: int | None = None
    uncached_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason}
        if self.prompt_tokens is not None:
            out["prompt_tokens"] = self.prompt_tokens
        if self.uncached_tokens is not None:
            out["uncached_tokens"] = self.uncached_tokens
        return out


class PdDecider(Plugin):
    """Whether a request's prefill should run on a prefill pod, given the decode pod already chosen."""

    def decide(self, request: InferenceRequest, decode: Endpoint) -> Verdict:
        raise NotImplementedError


@register_plugin("always-disagg-pd-decider")
class AlwaysDisaggDecider(PdDecider):
    def decide(self, request: InferenceRequest, decode: Endpoint) -> Verdict:
        return Verdict(True, "always")


@register_plugin("prefix-based-pd-decider")
class PrefixBasedDecider(PdDecider):
    def __init__(self, non_cached_tokens: int = 0, prompt_tokens: int = 0, prefix_plugin_name: str | None = None,
                 kv_transfer_fixed_tokens: int = DEFAULT_TRANSFER_FIXED_TOKENS,
                 kv_transfer_token_cost: float = DEFAULT_TRANSFER_TOKEN_COST) -> None:
        self.non_cached = check_int(non_cached_tokens, "nonCachedTokens", 0)
        self.min_prompt = check_int(prompt_tokens, "promptTokens", 0)
        self.prefix_name = check_str(prefix_plugin_name, "prefixPluginName") if prefix_plugin_name else None
        self.fixed = check_int(kv_transfer_fixed_tokens, "kvTransferFixedTokens", 0)
        self.per_token = check_float(kv_transfer_token_cost, "kvTransferTokenCost", 0.0, 1.0)
        self._source: Any = None

    def start(self) -> None:
        # No prefix plugin: every prompt token counts as uncached on the decode pod.
        self._source = resolve_prefix_source(self, self.prefix_name, required=bool(self.prefix_name))

    def _tokens(self, request: InferenceRequest, decode: Endpoint) -> tuple[int, int]:
        """(prompt tokens, of which the decode pod does not hold)."""
        if self._source is not None:
            prod = self._source.prefix_producer()
            st = prod.state(request, [decode])
            held = st.matched_tokens(prod.match(st, decode)) if st else 0
            return st.prompt_tokens, max(0, st.prompt_tokens - held)
        body = request.body
        if body.prompt_token_ids is not None:
            n = len(body.prompt_token_ids)
        else:
            pool = self.handle.pool if self.handle is not None else None
            chars = len(body.prompt_text or "")
            n = pool.tokens.tokens(request.target_model or request.model, chars) if pool else chars // 4
        return n, n

    def decide(self, request: InferenceRequest, decode: Endpoint) -> Verdict:
        if self.non_cached <= 0:
            return Verdict(False, "disabled")
        prompt, uncached = self._tokens(request, decode)
        if prompt < self.min_prompt:
            return Verdict(False, "short-prompt", prompt, uncached)
        if uncached < self.non_cached:
            return Verdict(False, "below-non-cached-tokens", prompt, uncached)
        if uncached * (1.0 - self.per_token) <= self.fixed:
            return Verdict(False, "transfer-costs-more", prompt, uncached)
        return Verdict(True, "non-cached-tokens", prompt, uncached)


_STAGES = ("decode", "prefill", "encode")


@register_plugin("disagg-profile-handler")
class DisaggProfileHandler(ProfileHandler):
    def __init__(self, profiles: Any = None, deciders: Any = None) -> None:
        names = check_mapping(profiles if profiles is not None else {}, "profiles", set(_STAGES))
        self.profile = {s: check_str(names.get(s, s), f"profiles.{s}") for s in _STAGES}
        chosen = check_mapping(deciders if deciders is not None else {}, "deciders", {"prefill", "encode"})
        if chosen.get("encode"):
            raise ValueError("deciders.encode: the encode stage (multimodal encoders) is not supported")
        self.decider_name = check_str(chosen["prefill"], "deciders.prefill") if chosen.get("prefill") else None
        self.decider: PdDecider | None = None
        # request.attributes: the decider's verdict, from pick_profiles to process_results of the same request
        self._verdict_key = ("disagg-verdict", id(self))

    def start(self) -> None:
        if self.decider_name is None:
            return
        found = self.handle.plugin(self.decider_name) if self.handle is not None else None
        if not isinstance(found, PdDecider):
            raise PluginConfigError(f"plugin {self.name!r}: deciders.prefill {self.decider_name!r} is not a "
                                    "prefill decider (prefix-based-pd-decider, always-disagg-pd-decider)")
        self.decider = found

    def check_profiles(self, profiles: Mapping[str, Any]) -> None:
        decode, prefill = self.profile["decode"], self.profile["prefill"]
        if decode not in profiles:
            raise PluginConfigError(f"plugin {self.name!r}: no scheduling profile named {decode!r} (profiles.decode)")
        if self.decider_name is not None and prefill not in profiles:
            raise PluginConfigError(f"plugin {self.name!r}: no scheduling profile named {prefill!r} "
                                    "(profiles.prefill)")

    def pick_profiles(self, request: InferenceRequest, profiles: Mapping[str, Any],
                      results: Mapping[str, ProfileResult | None]) -> dict[str, Any]:
        decode, prefill = self.profile["decode"], self.profile["prefill"]
        if decode not in results:
            return {decode: profiles[decode]}
        done = results[decode]
        if not done or not done.endpoints or prefill in results or self.decider is None or prefill not in profiles:
            return {}
        verdict = self.decider.decide(request, done.endpoints[0])
        request.attributes[self._verdict_key] = verdict
        return {prefill: profiles[prefill]} if verdict.split else {}

    def process_results(self, request: InferenceRequest,
                        results: dict[str, ProfileResult | None]) -> SchedulingResult:
        decode_name = self.profile["decode"]
        result = SchedulingResult(results, decode_name)
        verdict: Verdict = request.attributes.pop(self._verdict_key, None) or Verdict(False, "no-decider")
        decode = results.get(decode_name)
        if not decode or not decode.endpoints:
            return result  # the scheduler answers "no endpoint"
        info = verdict.as_dict()
        pre = results.get(self.profile["prefill"])
        target = pre.endpoints[0] if verdict.split and pre and pre.endpoints else None
        if target is None or target is decode.endpoints[0]:
            if verdict.split:
                info["reason"] = "no-prefill-endpoint"
            result.disagg = {"decision": DECODE_ONLY, **info}
            return result
        result.prefill = target
        result.request_headers[PREFILLER_HEADER] = target.hostport
        result.disagg = {"decision": PREFILL_DECODE, "prefill": target.name, **info}
        return result
