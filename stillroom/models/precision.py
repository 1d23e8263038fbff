"""Dtypes by name, and where bf16 is fast: resolved once, here, for every command.

bf16 autocast is 2-3x faster than fp32 on CPUs with AVX512-BF16 or AMX and on
recent GPUs, but on a CPU with only AVX2 oneDNN has no bf16 kernels and a bf16
matmul is about 10x slower than fp32 (measured: 39 s vs 4.3 s for a
1024x576 @ 576x49152 product). ``auto`` settings resolve here, once, before step 0.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8, "int16": torch.int16, "uint16": torch.uint16, "int32": torch.int32,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}
"""Every dtype a recipe, a flag or a store manifest names, by its name."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"bfloat16"`` -> ``torch.bfloat16``); ValueError naming the valid ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


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


def weights_dtype(setting: str, device: str) -> torch.dtype:
    """The torch dtype of weights set as ``setting`` (``auto`` resolved for ``device``)."""
    return torch_dtype(resolve_dtype(setting, device))


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast on ``device`` for ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
