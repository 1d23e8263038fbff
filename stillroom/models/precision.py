"""Dtypes by name, and where bf16 is fast: resolved once, here, for every command.

bf16 autocast is 2-3x faster than fp32 on CPUs with AMX and on recent GPUs, but a CPU's bf16 support says
little about its speed: on a CPU with only AVX2 oneDNN has no bf16 kernels and a bf16 matmul is about 10x
slower than fp32 (measured: 39 s vs 4.3 s for a 1024x576 @ 576x49152 product), and on a 2-core Xeon with
AVX512-BF16 but no AMX (2026-12-07) bf16 matmuls ran at 0.6-1.05x fp32's speed, so a bf16 quickstart was
slower than an fp32 one. ``auto`` on a CPU therefore times bf16 against fp32 on matmuls of a small LM's shapes
(:func:`cpu_bf16_speedup`, about a second, once per machine, torch version and thread count; kept in
``<cache>/precision/``) and takes bf16 only where it is at least ``BF16_MIN_SPEEDUP`` times faster. ``auto``
settings resolve here, once, before step 0, and the run's ``config.resolved.yaml`` records the result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from stillroom.models.builtin import cache_root

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


BF16_MIN_SPEEDUP = 1.2
"""``auto`` takes bf16 on a CPU whose bf16 matmuls run at least this many times faster than fp32's: where the two
are close, fp32's exact logits are worth more than the difference."""
RANK_WAIT_S = 120.0
"""How long a process of local rank > 0 waits for local rank 0's measurement before measuring itself."""
PROBE_SHAPES = ((256, 576, 1536), (256, 1536, 576), (256, 576, 4096))
"""``(rows, in, out)`` of the timed matmuls: a small LM's MLP up and down projections and a slice of its head."""


def fast_bf16(device: str) -> bool:
    """Whether bf16 autocast pays on ``device``: a CUDA device that supports it; a CPU whose oneDNN has bf16
    kernels and whose measured bf16 matmuls are at least ``BF16_MIN_SPEEDUP`` times faster than fp32's."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return _onednn_has_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    return False


def auto_reason(device: str) -> str:
    """Why ``auto`` resolves as it does on ``device``, for the run's log: ``bf16 matmuls measured 0.60x fp32's
    speed on this CPU (bf16 from 1.2x)``; empty off the CPU or where oneDNN has no bf16 kernels (nothing measured)."""
    if torch.device(device).type != "cpu" or not _onednn_has_bf16():
        return ""
    return f"bf16 matmuls measured {cpu_bf16_speedup():.2f}x fp32's speed on this CPU (bf16 from {BF16_MIN_SPEEDUP}x)"


def _onednn_has_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of ``PROBE_SHAPES`` matmuls on this CPU (geometric mean; > 1: bf16 is faster).

    Measured once per CPU model and flags and torch version, and kept in ``<cache>/precision/<key>.json`` (written
    atomically), so every command on one machine resolves ``auto`` the same way. On one thread, each dtype's best
    of 7 interleaved rounds: a busy machine stalls a multi-threaded matmul at its barriers, and on a 2-core machine
    shared with two other jobs the 2-thread ratio read 1.3-1.7 where the quiet one is 0.6 (2026-12-07); the
    1-thread ratio read 0.37-0.48 there, 0.56 quiet (and 2 threads, quiet, 0.61)."""
    path = probe_file()
    # the processes of one machine must agree (a bf16 rank beside an fp32 one would train two different models):
    # under torchrun only local rank 0 measures; the others wait for its file
    waited, patience = 0.0, RANK_WAIT_S if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 else 0.0
    while True:
        try:
            return float(json.loads(path.read_text())["bf16_speedup"])
        except (OSError, ValueError, KeyError, TypeError):
            if waited >= patience:
                break
        time.sleep(0.1)
        waited += 0.1
    speedup = _time_bf16_speedup()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"bf16_speedup": speedup, "torch": torch.__version__,
                                   "cpu": _cpu_identity()[:200], "shapes": PROBE_SHAPES}) + "\n")
        os.replace(tmp, path)
    except OSError:  # a read-only cache: the measurement serves this process alone, the run goes on
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return speedup


def probe_file() -> Path:
    """``<cache>/precision/<key>.json``: this CPU's (model name and flags) and torch version's measurement."""
    key = hashlib.sha1(f"{_cpu_identity()}|{torch.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "precision" / f"{key}.json"


def _time_bf16_speedup(rounds: int = 7) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed_ratio(rounds)
    finally:
        torch.set_num_threads(threads)


def _timed_ratio(rounds: int) -> float:
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for rows, d_in, d_out in PROBE_SHAPES:
        best = {}
        operands = {dt: (torch.randn(rows, d_in, generator=gen).to(dt), torch.randn(d_out, d_in, generator=gen).to(dt))
                    for dt in (torch.float32, torch.bfloat16)}
        for dt, (x, w) in operands.items():  # warm-up: oneDNN builds its kernels on the first calls
            for _ in range(2):
                torch.nn.functional.linear(x, w)
        for _ in range(rounds):
            for dt, (x, w) in operands.items():
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best[dt] = min(best.get(dt, math.inf), time.perf_counter() - t0)
        ratios.append(best[torch.float32] / best[torch.bfloat16])
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _cpu_identity() -> str:
    """The CPU's model name and flags (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = {}
    for line in info.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return f"{fields.get('model name', '')} {fields.get('flags', fields.get('Features', ''))}"


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
