"""Fine-tuning transfer (Lin et al. 2025, "Efficient Model Development through Fine-tuning Transfer"; spec 14e).

The diff vector of a fine-tuned model against its base, Δ = m'_s - m_s, added to a newer base of the same
architecture: ``out = m_t + scale * Δ``, tensor by tensor in float64, cast back to m_t's dtype. Before any
tensor is read, :func:`check_inputs` compares the three folders and raises a named error for a different
architecture (config ``model_type`` and shape-defining fields), different parameter names or shapes, or a
different tokenizer. A fine-tuned model with extra vocabulary rows (tokens added during fine-tuning, on top of
the base's vocabulary with the same ids) is handled as the official code does: the bases' embedding and
lm_head rows are zero-padded first, so the new rows are ``scale * m'_s[row]``. The output is a plain Hugging
Face folder (safetensors + the fine-tuned model's config and tokenizer) plus ``transfer.json``; it can start
further fine-tuning as ``student.model.path`` ("recycling").
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stillroom.compress.merge import _weight_files

if TYPE_CHECKING:
    from stillroom.config.transfer import TransferConfig

Log = Callable[[str], None]

# config fields that fix every tensor's shape (vocab_size is checked apart: the fine-tuned model may add rows)
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "num_local_experts", "moe_intermediate_size")
ROLES = ("fine_tuned", "base", "new_base")


class TransferError(ValueError):
    """A transfer whose inputs do not fit together; the message names the folders, the field or tensor."""


class ArchitectureMismatch(TransferError):
    pass


class TensorMismatch(TransferError):
    pass


class TokenizerMismatch(TransferError):
    pass


@dataclass
class ModelFolder:
    """One input: its config, and where each tensor lives (name -> safetensors file) with its shape."""

    role: str
    path: Path
    config: dict
    files: dict[str, str]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, role: str, path: str | Path) -> "ModelFolder":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--{role.replace('_', '-')} {path}: not a folder; pass a Hugging Face model folder")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"--{role.replace('_', '-')} {path}: no config.json; pass a Hugging Face model folder")
        config = json.loads(config_path.read_text())
        files, shapes = {}, {}
        for fname in _weight_files(path):
            with safe_open(str(path / fname), framework="pt") as f:
                for name in f.keys():
                    files[name] = fname
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        if config.get("tie_word_embeddings") and "lm_head.weight" in files and len(files) > 1:
            files.pop("lm_head.weight")  # a tied head stored twice: the embedding is the one tensor
            shapes.pop("lm_head.weight")
        return cls(role, path, config, files, shapes)

    def text_config(self) -> dict:
        """The decoder's config (a VLM's ``text_config``; a text model's own)."""
        return {**self.config, **self.config.get("text_config", {})}

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def check_architecture(folders: list[ModelFolder]) -> None:
    """Same ``model_type`` and shape-defining config fields in every folder; bases with the same vocabulary size,
    the fine-tuned model's at least as large. Raises :class:`ArchitectureMismatch` naming the field."""
    ref = folders[0]
    for other in folders[1:]:
        a, b = ref.text_config(), other.text_config()
        diff = {k: (a.get(k), b.get(k)) for k in SHAPE_FIELDS if a.get(k) != b.get(k)}
        if diff:
            raise ArchitectureMismatch(
                f"{ref.role} ({ref.path}) and {other.role} ({other.path}) have different architectures: "
                + ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in diff.items())
                + "; fine-tuning transfer needs three models of one architecture (same config except vocab rows)")
    vocab = {f.role: f.text_config().get("vocab_size") for f in folders}
    if vocab["base"] != vocab["new_base"]:
        raise ArchitectureMismatch(f"base has vocab_size {vocab['base']} but new_base {vocab['new_base']}: "
                                   "the two bases must share one vocabulary")
    if vocab["fine_tuned"] is not None and vocab["base"] is not None and vocab["fine_tuned"] < vocab["base"]:
        raise ArchitectureMismatch(f"fine_tuned has vocab_size {vocab['fine_tuned']}, fewer than its base's "
                                   f"{vocab['base']}: rows cannot be removed by a transfer")


def padded_rows(ft: ModelFolder, base: ModelFolder) -> int:
    """How many vocabulary rows the fine-tuned model adds over its base (0 when none)."""
    return int(ft.text_config().get("vocab_size") or 0) - int(base.text_config().get("vocab_size") or 0)


def check_tensors(ft: ModelFolder, base: ModelFolder, new: ModelFolder) -> list[str]:
    """Same parameter names in all three and the same shapes, except the vocabulary rows the fine-tuned model
    adds (first dimension only, on tensors whose first dimension is the vocabulary). Returns the names of the
    tensors that get zero-padded rows. Raises :class:`TensorMismatch` naming the first differing tensor."""
    for other in (base, new):
        only_ft, only_other = sorted(set(ft.files) - set(other.files)), sorted(set(other.files) - set(ft.files))
        if only_ft or only_other:
            raise TensorMismatch(f"different parameter names: only in fine_tuned ({ft.path}): {only_ft[:5]}, only in "
                                 f"{other.role} ({other.path}): {only_other[:5]}; the models must share every name")
    extra = padded_rows(ft, base)
    vocab = int(base.text_config().get("vocab_size") or 0)
    padded = []
    for name, shape in ft.shapes.items():
        if base.shapes[name] != new.shapes[name]:
            raise TensorMismatch(f"tensor {name!r} has shape {base.shapes[name]} in base but {new.shapes[name]} in "
                                 "new_base; the bases must have the same architecture")
        if shape == base.shapes[name]:
            continue
        if extra > 0 and shape[0] == vocab + extra and base.shapes[name][0] == vocab and shape[1:] == base.shapes[name][1:]:
            padded.append(name)
            continue
        raise TensorMismatch(f"tensor {name!r} has shape {shape} in fine_tuned but {base.shapes[name]} in base; "
                             "only extra vocabulary rows may differ")
    return padded


def check_tokenizers(ft: ModelFolder, base: ModelFolder, new: ModelFolder) -> dict[str, str]:
    """The two bases' tokenizers must be identical (vocabulary and special tokens: ``tokenizer_hash``); the
    fine-tuned model's must equal its base's, or extend it (every base token at the same id). Returns the hashes.
    Raises :class:`TokenizerMismatch`."""
    from stillroom.models import tokenizer_hash

    toks = {f.role: _tokenizer(f) for f in (ft, base, new)}
    hashes = {role: tokenizer_hash(t) for role, t in toks.items()}
    if hashes["base"] != hashes["new_base"]:
        raise TokenizerMismatch(f"base ({base.path}) and new_base ({new.path}) have different tokenizers "
                                f"(vocabulary or special tokens differ: {_first_difference(toks['base'], toks['new_base'])});"
                                " a diff vector only transfers between models of one tokenizer")
    if hashes["fine_tuned"] != hashes["base"]:
        v_base, v_ft = toks["base"].get_vocab(), toks["fine_tuned"].get_vocab()
        moved = [t for t, i in v_base.items() if v_ft.get(t) != i]
        if moved:
            raise TokenizerMismatch(f"fine_tuned ({ft.path}) does not extend its base's tokenizer ({base.path}): "
                                    f"{len(moved)} base tokens are missing or at other ids, e.g. {moved[:3]}")
    return hashes


def check_inputs(ft: ModelFolder, base: ModelFolder, new: ModelFolder) -> tuple[list[str], dict[str, str]]:
    """Every check, before any tensor is read: architecture, names and shapes, tokenizers."""
    check_architecture([ft, base, new])
    padded = check_tensors(ft, base, new)
    return padded, check_tokenizers(ft, base, new)


def transfer_tensor(ft: torch.Tensor, base: torch.Tensor, new: torch.Tensor, scale: float) -> torch.Tensor:
    """``new + scale * (ft - base)`` in float64, cast to ``new``'s dtype. ``base``/``new`` [V, ...] are zero-padded
    to ``ft``'s [V', ...] rows first when the fine-tuned model added vocabulary rows (V' > V)."""
    ft64, base64, new64 = (t.to(torch.float64) for t in (ft, base, new))
    if ft64.shape[0] > base64.shape[0]:
        base64, new64 = (_zero_pad_rows(t, ft64.shape[0]) for t in (base64, new64))
    return (new64 + scale * (ft64 - base64)).to(new.dtype)


def _zero_pad_rows(t_vd: torch.Tensor, rows: int) -> torch.Tensor:
    pad = t_vd.new_zeros((rows - t_vd.shape[0], *t_vd.shape[1:]))
    return torch.cat([t_vd, pad], dim=0)


def transfer(cfg: TransferConfig, *, log: Log = functools.partial(print, flush=True)) -> Path:
    """``stillroom transfer``: write ``cfg.new_base + cfg.scale * (cfg.fine_tuned - cfg.base)`` into ``cfg.out``
    (built under ``<out>.tmp`` and renamed) with ``transfer.json``; returns the output folder."""
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"--out {out} exists; choose another folder or pass --overwrite")
    if not math.isfinite(cfg.scale):
        raise TransferError(f"--scale must be a finite number, got {cfg.scale}")
    ft, base, new = (ModelFolder.open(role, getattr(cfg, role)) for role in ROLES)
    padded, tok_hashes = check_inputs(ft, base, new)
    if padded:
        log(f"fine_tuned adds {padded_rows(ft, base)} vocabulary rows: zero-padding the bases' {padded} first "
            "(the new rows become scale * fine_tuned's rows)")
    log(f"transferring {len(ft.files)} tensors: {new.path} + {cfg.scale} * ({ft.path} - {base.path}) ...")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        norms = _write_tensors(ft, base, new, cfg.scale, tmp)
        _copy_side_files(ft.path, tmp)
        summary = _summary(cfg, (ft, base, new), tok_hashes, padded, norms)
        (tmp / "transfer.json").write_text(json.dumps(summary, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written output left behind
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"wrote {out} (diff norm {summary['diff_norm']['total']:.4g}; relative to new_base "
        f"{summary['diff_norm']['relative_total']:.4g}; details in transfer.json)")
    return out


def _write_tensors(ft: ModelFolder, base: ModelFolder, new: ModelFolder, scale: float, tmp: Path) -> dict:
    """One output shard per fine-tuned shard (same names); returns {name: (|Δ|, |m_t|)} in float64."""
    from safetensors.torch import save_file

    norms: dict[str, tuple[float, float]] = {}
    by_file: dict[str, list[str]] = {}
    for name, fname in ft.files.items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in sorted(by_file.items()):
        shard = {}
        for name in names:
            t_ft, t_base, t_new = ft.tensor(name), base.tensor(name), new.tensor(name)
            if not (t_ft.is_floating_point() and t_new.is_floating_point()):
                raise TensorMismatch(f"tensor {name!r} is not floating point ({t_ft.dtype}); a diff vector needs "
                                     "floating weights (dequantize the models first)")
            shard[name] = transfer_tensor(t_ft, t_base, t_new, scale).contiguous()
            diff = (t_ft.to(torch.float64)[: t_base.shape[0]] - t_base.to(torch.float64)).norm().item()
            norms[name] = (diff, t_new.to(torch.float64).norm().item())
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
    if len(by_file) > 1:
        index = json.loads((ft.path / "model.safetensors.index.json").read_text())
        index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n in ft.files}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return norms


def _copy_side_files(src: Path, dst: Path) -> None:
    """The fine-tuned model's config, generation config and tokenizer files (no weights, no stillroom notes)."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) \
                and p.name not in ("model.safetensors.index.json", "transfer.json", "stillroom.json",
                                   "stillroom_merge.json"):
            shutil.copy2(p, dst / p.name)


def _summary(cfg: TransferConfig, folders: tuple[ModelFolder, ...], tok_hashes: dict, padded: list[str],
             norms: dict[str, tuple[float, float]]) -> dict:
    """transfer.json: the inputs with their weight and tokenizer hashes, the scale, the diff norms."""
    total = math.sqrt(sum(d * d for d, _ in norms.values()))
    base_total = math.sqrt(sum(b * b for _, b in norms.values()))
    relative = {n: d / b if b > 0 else float("inf") for n, (d, b) in norms.items()}
    top = sorted(relative.items(), key=lambda kv: -kv[1])[:5]
    return {
        "formula": "new_base + scale * (fine_tuned - base)", "scale": cfg.scale, "out": str(cfg.out),
        "inputs": {f.role: {"path": str(f.path), "weights_sha256": _weights_hash(f),
                            "tokenizer_hash": tok_hashes[f.role]} for f in folders},
        "padded_vocab_rows": padded_rows(folders[0], folders[1]), "padded_tensors": padded,
        "diff_norm": {"tensors": len(norms), "total": total, "relative_total": total / base_total if base_total else 0.0,
                      "max_relative": top[0][1] if top else 0.0, "largest_relative": [[n, r] for n, r in top],
                      "unchanged_tensors": sum(1 for d, _ in norms.values() if d == 0.0)},
    }


def _weights_hash(folder: ModelFolder) -> str:
    """sha256 over the folder's safetensors files (in name order), read in 1 MiB blocks."""
    h = hashlib.sha256()
    for fname in sorted(set(folder.files.values())):
        with (folder.path / fname).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _tokenizer(folder: ModelFolder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder.path))
    except (OSError, ValueError) as e:
        raise TokenizerMismatch(f"{folder.role} ({folder.path}): cannot load its tokenizer ({e}); the tokenizer "
                                "files must be in the folder, so that the tokenizers can be compared") from e


def _first_difference(a, b) -> str:
    va, vb = a.get_vocab(), b.get_vocab()
    moved = sorted(t for t in set(va) | set(vb) if va.get(t) != vb.get(t))
    if moved:
        return f"{len(moved)} tokens differ, e.g. {moved[:3]}"
    return f"special tokens {sorted(set(a.all_special_tokens) ^ set(b.all_special_tokens))}"
