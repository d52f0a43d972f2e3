"""One typed configuration shared by the CLI, the importable API and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from epp_sim.profiles import PROFILES, Profile

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass(slots=True)
class SimConfig:
    model: str = DEFAULT_MODEL
    served_model_names: list[str] = field(default_factory=list)  # empty -> [model]
    lora_adapters: list[str] = field(default_factory=list)
    max_loras: int = 1
    profile: str = "instant"
    seed: int = 0
    # Capacity and batching; None takes the profile's value.
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    enable_prefix_caching: bool = True
    # Timing overrides (seconds); None takes the profile's value.
    step_fixed_s: float | None = None
    prefill_token_s: float | None = None
    decode_seq_s: float | None = None
    context_token_s: float | None = None
    tokenizer: str | None = None  # path to a HF tokenizer.json; None -> the built-in pseudo-tokenizer
    vocab_size: int = 128256
    embedding_dim: int = 384
    legacy_metrics: bool = False  # also expose the deprecated vllm:gpu_* aliases
    kv_events: str | None = None  # ZMQ endpoint; "" or None disables publishing (events still kept in memory)
    kv_events_buffer: int = 0  # batches kept for GET /sim/kv_events; 0 disables event collection entirely
    kv_events_topic: str | None = None  # ZMQ topic; None -> "kv@<host:port>@<model>" (llm-d's); vLLM's default is ""
    kv_events_encoding: str = "array"  # "array": vLLM's positional msgpack events; "map": {"type": ..., fields}
    kv_events_hash: str = "int"  # block hashes as 64-bit ints (vLLM's default) or "bytes" (32-byte digests)
    kv_events_replay: str | None = None  # ZMQ ROUTER endpoint answering vLLM's replay requests; port offset per pod
    wake_latency_s: float = 0.6  # POST /wake_up after sleeping at level 1 (weights back from CPU RAM)
    wake_latency_level2_s: float = 2.0  # ... at level 2 (weights reloaded)
    # P/D disaggregation (sim/pd.py): llm-d role of each pod, by pod index ("prefill" | "decode" | "both";
    # pods past the list are "both"), and the KV pull a decode pod makes after a remote prefill.
    roles: list[str] = field(default_factory=list)
    kv_transfer_fixed_s: float = 0.001  # per pull: connection set-up, block-id exchange
    kv_transfer_token_s: float = 5e-6  # per token pulled (8B model, ~128 KiB/token over RDMA at ~25 GB/s)

    def resolved(self) -> ResolvedConfig:
        try:
            prof = PROFILES[self.profile]
        except KeyError:
            raise ValueError(f"unknown profile {self.profile!r}; choose one of {sorted(PROFILES)}") from None
        values: dict[str, Any] = {}
        for f in fields(Profile):
            if f.name == "name":
                continue
            own = getattr(self, f.name, None)
            values[f.name] = own if own is not None else getattr(prof, f.name)
        capacity = values["num_gpu_blocks"] * values["block_size"]
        # vLLM refuses to start when one max-length request cannot fit the KV cache; we clamp instead.
        values["max_model_len"] = min(values["max_model_len"], capacity)
        return ResolvedConfig(base=self, profile=replace(prof, **values))


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """A SimConfig with every profile default filled in."""

    base: SimConfig
    profile: Profile

    @property
    def served_names(self) -> list[str]:
        return list(self.base.served_model_names) or [self.base.model]

    @property
    def model_label(self) -> str:
        return self.served_names[0]
