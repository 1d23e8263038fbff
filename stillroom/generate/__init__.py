"""Sampling for teachers and students, and lossless speculative decoding with acceptance metrics."""

from stillroom.generate.distributions import sample_from, warp_to_probs
from stillroom.generate.sampling import sample_continuations
from stillroom.generate.speculative import (
    SpecResult,
    SpecStats,
    autoregressive_generate,
    expected_block_efficiency,
    mbsu,
    speculative_generate,
)

__all__ = [
    "SpecResult",
    "SpecStats",
    "autoregressive_generate",
    "expected_block_efficiency",
    "mbsu",
    "sample_continuations",
    "sample_from",
    "speculative_generate",
    "warp_to_probs",
]
