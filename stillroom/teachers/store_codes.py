"""Quantised top-k log-probabilities of a teacher store: the int8 and int4 modes (see docs/STORE.md).

Per position (row), the k sorted log-probs are coded on that row's own range with ``L`` levels
(int8: ``L = 255``, one code per byte; int4: ``L = 15``, two codes per byte)::

    step = (max - min) / L,   code = round((max - lp) / step),   lp ~= max - code * step

``max`` and ``step`` are stored per row in ``scale_dtype``: float16 (the default since the store-size
study, 4 bytes per position) or float32 (stores written before it; still read). In float16 the coder
uses the *stored* (rounded) ``max`` and a ``step`` rounded *up* to the next float16, so that the
codes are computed against exactly the values the reader sees: the per-value error stays at most
``step / 2`` (``step`` grows by at most 1/1024), except for values above the rounded ``max`` (only the
row maximum, and only when float16 rounded it down), which are off by at most half a float16 ulp of
``max`` (<= 0.004 nats for ``|max| < 16``).

Why per row: a row's range is set by its own top-k (typically 5-20 nats at k = 16-64), so one global
scale would waste most codes on rows with a narrow range.

int4 layout: codes ``[N, K]`` (0..15) are packed into ``topk_logprob_nibbles [N, ceil(K / 2)]`` uint8,
column ``j`` in the low nibble of byte ``j // 2`` when ``j`` is even and the high nibble when odd (an odd
K leaves the last high nibble 0). K is the width of ``topk_ids``.
"""

from __future__ import annotations

import torch

LEVELS = {"int8": 255, "int4": 15}
"""Code levels of the quantised ``logprob_dtype`` modes."""
SCALE_DTYPES = ("float16", "float32")
"""Storage types of the per-row ``logprob_max`` / ``logprob_step`` of a quantised mode."""


def quantize(lp_nk: torch.Tensor, levels: int = 255,
             scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of log-probs ``[N, K]`` on each row's own range; ``(codes [N, K] uint8, max [N], step [N])``.

    ``max`` and ``step`` come back in ``scale_dtype`` (what is stored); ``lp ~= max - code * step``.
    """
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
    dt = torch.float16 if scale_dtype == "float16" else torch.float32
    lp = lp_nk.float()
    hi = lp.max(-1).values.to(dt)
    lo = lp.min(-1).values
    step = ((hi.float() - lo) / levels).to(dt)
    if dt == torch.float16:  # round the step up, so that every code of the row's range fits in `levels`
        low = step.float() * levels < hi.float() - lo
        step = torch.where(low, torch.nextafter(step, torch.full_like(step, float("inf"))), step)
    safe = torch.where(step > 0, step.float(), torch.ones_like(lo))
    codes = ((hi.float().unsqueeze(-1) - lp) / safe.unsqueeze(-1)).round().clamp(0, levels).to(torch.uint8)
    return codes, hi, step


def dequantize(codes_nk: torch.Tensor, hi_n: torch.Tensor, step_n: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs ``[N, K]`` from codes and the row scales (any stored dtype)."""
    return hi_n.float().unsqueeze(-1) - codes_nk.float() * step_n.float().unsqueeze(-1)


def quantize_int8(lp_nk: torch.Tensor, scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes (``step = (max - min) / 255``); with float32 scales the row maximum is exact."""
    return quantize(lp_nk, 255, scale_dtype)


def dequantize_int8(codes_nk: torch.Tensor, hi_n: torch.Tensor, step_n: torch.Tensor) -> torch.Tensor:
    return dequantize(codes_nk, hi_n, step_n)


def pack_nibbles(codes_nk: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` codes in 0..15 -> ``[N, ceil(K / 2)]`` uint8 (even columns in the low nibble)."""
    if codes_nk.shape[-1] % 2:
        codes_nk = torch.cat([codes_nk, torch.zeros_like(codes_nk[:, :1])], -1)
    c = codes_nk.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed_nb: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[N, ceil(K / 2)]`` uint8 -> ``[N, K]`` uint8."""
    out = torch.stack([packed_nb & 0x0F, packed_nb >> 4], -1).reshape(packed_nb.shape[0], -1)
    return out[:, :k]


def encode_logprobs(lp_nk: torch.Tensor, logprob_dtype: str, scale_dtype: str) -> dict[str, torch.Tensor]:
    """The shard tensors of quantised log-probs: codes (int8) or nibbles (int4), ``logprob_max``, ``logprob_step``."""
    codes, hi, step = quantize(lp_nk, LEVELS[logprob_dtype], scale_dtype)
    out = {"topk_logprob_codes": codes} if logprob_dtype == "int8" else {"topk_logprob_nibbles": pack_nibbles(codes)}
    out.update(logprob_max=hi, logprob_step=step)
    return {k: v.contiguous() for k, v in out.items()}


def decode_quantized(tensors: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """fp32 ``[n, K]`` log-probs of rows ``lo:hi`` of an int8 or int4 shard (not renormalised)."""
    if "topk_logprob_codes" in tensors:
        codes = tensors["topk_logprob_codes"][lo:hi]
    else:
        codes = unpack_nibbles(tensors["topk_logprob_nibbles"][lo:hi], int(tensors["topk_ids"].shape[-1]))
    return dequantize(codes, tensors["logprob_max"][lo:hi], tensors["logprob_step"][lo:hi])
