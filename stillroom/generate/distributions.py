"""Turning next-token logits into the distribution a decoder samples from.

One function, :func:`warp_to_probs`, is used by plain sampling, by the draft and by
the target in speculative decoding, so ``sampling_temperature`` and ``top_p`` are
applied to p and q identically (a requirement of lossless speculative sampling).
"""

from __future__ import annotations

import torch


def check_sampling_args(sampling_temperature: float, top_p: float) -> None:
    """Raise ``ValueError`` with the offending argument for out-of-range settings."""
    if not (sampling_temperature > 0.0):
        raise ValueError(
            f"sampling_temperature must be > 0 (got {sampling_temperature}); use greedy=True for argmax decoding"
        )
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")


def warp_to_probs(logits_bv: torch.Tensor, sampling_temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities ``[B, V]`` (fp32) of ``softmax(logits / sampling_temperature)`` restricted to the nucleus.

    The nucleus is the smallest set of most-probable tokens whose mass reaches ``top_p``
    (the token that crosses ``top_p`` is kept, so at least one token always survives);
    the kept probabilities are renormalised. ``top_p == 1`` keeps everything. Entries
    with ``-inf`` logits get probability 0.
    """
    check_sampling_args(sampling_temperature, top_p)
    logits_bv = logits_bv.float() / sampling_temperature
    probs_bv = torch.softmax(logits_bv, dim=-1)
    if top_p >= 1.0:
        return probs_bv
    sorted_bv, order_bv = probs_bv.sort(dim=-1, descending=True)
    mass_before_bv = sorted_bv.cumsum(dim=-1) - sorted_bv  # mass of strictly more probable tokens
    keep_sorted_bv = mass_before_bv < top_p
    keep_sorted_bv[..., 0] = True
    keep_bv = torch.zeros_like(keep_sorted_bv).scatter(-1, order_bv, keep_sorted_bv)
    probs_bv = probs_bv * keep_bv
    return probs_bv / probs_bv.sum(dim=-1, keepdim=True)


def sample_from(probs_bv: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row ``[B]`` drawn from ``probs_bv`` ``[B, V]`` (rows need not sum to 1) with ``generator``.

    Inverse-CDF sampling: the first index whose cumulative mass exceeds ``u * total`` with
    ``u ~ U[0, 1)``; zero-probability entries are never chosen. (Several times faster than
    ``torch.multinomial`` for one draw on CPU.) When the generator lives on another device
    than the probabilities (e.g. a CPU generator and a CUDA model) the draw happens on the
    generator's device, so results depend only on the generator's seed.
    """
    device = probs_bv.device
    if generator is not None and generator.device != device:
        probs_bv = probs_bv.to(generator.device)
    cdf_bv = probs_bv.float().cumsum(dim=-1)
    u_b1 = torch.rand((cdf_bv.shape[0], 1), generator=generator, device=cdf_bv.device) * cdf_bv[:, -1:]
    ids_b = torch.searchsorted(cdf_bv, u_b1, right=True).squeeze(-1)
    return ids_b.clamp(max=probs_bv.shape[-1] - 1).to(device)


def uniform(generator: torch.Generator | None, device: torch.device | str = "cpu") -> float:
    """One draw from U[0, 1) with ``generator`` (on the generator's device)."""
    gen_device = generator.device if generator is not None else device
    return float(torch.rand((), generator=generator, device=gen_device))
