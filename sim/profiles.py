"""Timing and capacity presets. Where the `realistic` numbers come from is explained in sim/README.md."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Profile:
    """Cost model of one engine step plus the capacity defaults that go with it.

    step time = step_fixed_s
              + prefill_token_s * (uncached prompt tokens computed in the step)
              + decode_seq_s * (sequences decoding one token in the step)
              + context_token_s * (tokens of context those decoding sequences attend to)
    """

    name: str
    step_fixed_s: float
    prefill_token_s: float
    decode_seq_s: float
    context_token_s: float
    num_gpu_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    default_max_tokens: int


PROFILES: dict[str, Profile] = {
    # Functional tests: steps take no time, the loop just yields to the event loop between steps.
    "instant": Profile(
        name="instant",
        step_fixed_s=0.0,
        prefill_token_s=0.0,
        decode_seq_s=0.0,
        context_token_s=0.0,
        num_gpu_blocks=2048,
        block_size=16,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        max_model_len=16384,
        default_max_tokens=16,
    ),
    # Quick benchmarks and timing-sensitive tests: a few ms per step, prefill cost visible on long prompts.
    "fast": Profile(
        name="fast",
        step_fixed_s=0.002,
        prefill_token_s=2e-6,
        decode_seq_s=1e-5,
        context_token_s=0.0,
        num_gpu_blocks=4096,
        block_size=16,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
        max_model_len=32768,
        default_max_tokens=16,
    ),
    # Llama-3.1-8B, BF16, one H100 SXM 80GB, vLLM V1 defaults (see README for the derivation).
    "realistic": Profile(
        name="realistic",
        step_fixed_s=0.0065,
        prefill_token_s=4.0e-5,
        decode_seq_s=4.0e-5,
        context_token_s=4.7e-8,
        num_gpu_blocks=26000,
        block_size=16,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        max_model_len=32768,
        default_max_tokens=128,
    ),
    # The step model of an outside evaluation the benchmark's "pressure" suite reproduces (bench/README.md):
    # 10 ms per step + 0.1 ms per prefilled (uncached) token + 0.25 ms per decoding sequence, a 2,048-token
    # budget per step, blocks of 16, and a KV cache small enough that prefixes compete for it (2,048 blocks =
    # 32k tokens; --num-gpu-blocks 1024 for the tighter variant).
    "pressure": Profile(
        name="pressure",
        step_fixed_s=0.010,
        prefill_token_s=1.0e-4,
        decode_seq_s=2.5e-4,
        context_token_s=0.0,
        num_gpu_blocks=2048,
        block_size=16,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        max_model_len=32768,
        default_max_tokens=100,
    ),
}
