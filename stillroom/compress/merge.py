"""SLERP merging: tensor-by-tensor spherical linear interpolation of two models of the same architecture.

Self-data distillation (Thangarasa et al. 2025) merges pruned models recovered on different
data sets; ``stillroom merge A B --t 0.5 --out DIR`` runs :func:`merge` (a
:class:`~stillroom.config.commands.MergeConfig`), which runs :func:`merge_model_folders`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stillroom.config.commands import MergeConfig

# sin(Omega) below this: the tensors are (anti)parallel and SLERP's division is
# ill-conditioned; linear interpolation is used instead (the limit as Omega -> 0).
SIN_EPS = 1e-6


# ---------------------------------------------------------------------- SLERP

def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, eps: float = SIN_EPS) -> torch.Tensor:
    """Spherical linear interpolation of two same-shape tensors, treated as flat vectors.

    Omega = arccos(<a, b> / (|a| |b|)) (cosine clamped to [-1, 1], fp64 math);
    SLERP(a, b; t) = [sin((1 - t) Omega) a + sin(t Omega) b] / sin Omega.
    Falls back to the lerp (1 - t) a + t b when sin Omega < ``eps`` (nearly
    parallel or anti-parallel tensors) or either tensor is all zeros. t=0 gives
    ``a`` and t=1 gives ``b`` exactly. The result has ``a``'s dtype.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.to(a.dtype).clone()
    a64, b64 = a.detach().to(torch.float64).flatten(), b.detach().to(torch.float64).flatten()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        out = (1 - t) * a64 + t * b64
    else:
        cos = (a64 @ b64 / (na * nb)).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        sin_omega = torch.sin(omega)
        if sin_omega < eps:
            out = (1 - t) * a64 + t * b64
        else:
            out = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / sin_omega
    return out.reshape(a.shape).to(a.dtype)


def merge_state_dicts(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], t: float) -> dict:
    """SLERP every floating tensor of two state dicts (same keys and shapes); others must be equal.

    Raises ``ValueError`` naming the first missing/extra key, the tensor whose
    shapes differ, or a non-floating tensor (an integer buffer) whose values differ.
    """
    missing, extra = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
    if missing or extra:
        raise ValueError(
            f"the models have different tensors: only in A: {missing[:5]}, only in B: {extra[:5]}; "
            "merging needs two models of the same architecture"
        )
    return {name: merge_tensor(name, sd_a[name], sd_b[name], t) for name in sd_a}


def merge_tensor(name: str, a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """One tensor of a merge: SLERP for floating tensors, equality check for the rest."""
    if a.shape != b.shape:
        raise ValueError(
            f"tensor {name!r} has shape {tuple(a.shape)} in A but {tuple(b.shape)} in B; "
            "merging needs two models of the same architecture"
        )
    if a.is_floating_point() and b.is_floating_point():
        return slerp(a, b, t)
    if not torch.equal(a, b.to(a.dtype)):
        raise ValueError(f"non-floating tensor {name!r} ({a.dtype}) differs between A and B; it cannot be interpolated")
    return a.clone()


_WEIGHTS_INDEX = "model.safetensors.index.json"
_WEIGHTS_SINGLE = "model.safetensors"


def _weight_files(folder: Path) -> list[str]:
    """The safetensors file names of an HF model folder (sharded or not); refuses pickled weights."""
    if (folder / _WEIGHTS_INDEX).is_file():
        index = json.loads((folder / _WEIGHTS_INDEX).read_text())
        return sorted(set(index["weight_map"].values()))
    if (folder / _WEIGHTS_SINGLE).is_file():
        return [_WEIGHTS_SINGLE]
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    hint = f" (found {pickled}: pickled weights are never loaded; re-save the model with safetensors)" if pickled else ""
    raise FileNotFoundError(f"{folder}: no {_WEIGHTS_SINGLE} or {_WEIGHTS_INDEX}{hint}")


def _architecture(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    keys = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
    return {k: cfg.get(k) for k in keys}


def merge_model_folders(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike, *, t: float = 0.5,
                        overwrite: bool = False) -> dict:
    """SLERP-merge two HF model folders of the same architecture into ``out``; returns a summary.

    Reads safetensors shard by shard (never pickles), merges tensor by tensor
    with :func:`merge_tensor`, writes safetensors shards with A's layout, copies
    A's config, generation config and tokenizer files, and writes
    ``stillroom_merge.json``. The folder is built under ``<out>.tmp`` and renamed
    into place only when complete. Summary: ``tensors``, ``lerp_fallbacks``
    (floating tensors that were nearly parallel), ``t``, ``out``.
    """
    from safetensors import safe_open

    a, b, out = Path(a), Path(b), Path(out)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"--t must be in [0, 1], got {t}")
    arch_a, arch_b = _architecture(a), _architecture(b)
    diff = {k: (arch_a[k], arch_b[k]) for k in arch_a if arch_a[k] != arch_b[k]}
    if diff:
        raise ValueError(f"{a} and {b} have different architectures: {diff}; SLERP needs the same architecture")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    files_a = _weight_files(a)
    names_b: dict[str, str] = {}
    for fname in _weight_files(b):
        with safe_open(str(b / fname), framework="pt") as f:
            names_b.update({k: fname for k in f.keys()})
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        seen, lerps = _merge_shards(a, b, tmp, files_a, names_b, t)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written output left behind
        raise
    for p in a.iterdir():  # config, generation config, tokenizer, shard index
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) \
                and p.name != "stillroom.json":
            shutil.copy2(p, tmp / p.name)
    summary = {"a": str(a), "b": str(b), "t": t, "tensors": len(seen), "lerp_fallbacks": lerps}
    (tmp / "stillroom_merge.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    summary["out"] = str(out)
    return summary


def merge(cfg: MergeConfig, *, log: Callable[[str], None] = functools.partial(print, flush=True)) -> dict:
    """``stillroom merge``: SLERP ``cfg.a`` and ``cfg.b`` with weight ``cfg.t`` into ``cfg.out``; returns (and logs)
    :func:`merge_model_folders`' summary."""
    log(f"merging {cfg.a} and {cfg.b} (t={cfg.t}) ...")
    summary = merge_model_folders(cfg.a, cfg.b, cfg.out, t=cfg.t, overwrite=cfg.overwrite)
    log(f"merged {summary['tensors']} tensors (t={summary['t']}, {summary['lerp_fallbacks']} nearly parallel: lerp) "
        f"-> {summary['out']}")
    return summary


def _nearly_parallel(a: torch.Tensor, b: torch.Tensor, eps: float = SIN_EPS) -> bool:
    a64, b64 = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return True
    cos = float((a64 @ b64 / (na * nb)).clamp(-1.0, 1.0))
    return math.sin(math.acos(cos)) < eps


def _merge_shards(a: Path, b: Path, tmp: Path, files_a: list[str], names_b: dict[str, str], t: float):
    """Merge every shard of A with the matching tensors of B into ``tmp``; returns (names, lerp count)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    seen: set[str] = set()
    lerps = 0
    for fname in files_a:
        merged: dict[str, torch.Tensor] = {}
        with safe_open(str(a / fname), framework="pt") as fa:
            metadata = fa.metadata() or {}
            for name in fa.keys():
                if name not in names_b:
                    raise ValueError(f"tensor {name!r} is in {a} but not in {b}; the architectures differ")
                ta = fa.get_tensor(name)
                with safe_open(str(b / names_b[name]), framework="pt") as fb:
                    tb = fb.get_tensor(name)
                merged[name] = merge_tensor(name, ta, tb, t)
                lerps += int(ta.is_floating_point() and _nearly_parallel(ta, tb))
                seen.add(name)
        save_file(merged, str(tmp / fname), metadata={**metadata, "format": "pt"})
    extra = sorted(set(names_b) - seen)
    if extra:
        raise ValueError(f"tensors only in {b}: {extra[:5]}; the architectures differ")
    return seen, lerps
