"""Choose bf16 only where it is fast.

bf16 autocast is 2-3x faster than fp32 on CPUs with AVX512-BF16 or AMX and on
recent GPUs, but on a CPU with only AVX2 oneDNN has no bf16 kernels and a bf16
matmul is about 10x slower than fp32 (measured: 39 s vs 4.3 s for a
1024x576 @ 576x49152 product). ``auto`` settings resolve here, once, before step 0.
"""

from __future__ import annotations

import torch


def fast_bf16(device: str) -> bool:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def resolve_precision(setting: str, device: str) -> str:
    """``auto`` -> ``bf16`` or ``fp32`` for ``device``; explicit settings pass through."""
    if setting != "auto":
        return setting
    return "bf16" if fast_bf16(device) else "fp32"


def resolve_dtype(setting: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` or ``float32`` weights for ``device``."""
    if setting != "auto":
        return setting
    return "bfloat16" if fast_bf16(device) else "float32"
