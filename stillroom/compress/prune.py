"""`stillroom prune`: load a model, draw calibration batches, prune depth -> width -> sparsity, write a
plain Hugging Face folder (weights in safetensors + tokenizer) with ``prune_report.json`` / ``.md``.

Every target is checked against the loaded model before calibration or pruning starts (a key naming
the model's value); the folder is written under ``<out>.tmp`` and renamed, so a crash never leaves a
half-written model where a later stage would read it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.compress.calibration import calibration_batches
from stillroom.compress.depth import PruneTargetError, check_depth, prune_depth
from stillroom.compress.width import check_width, prune_width
from stillroom.config.schema import RunConfig
from stillroom.models.derive import decoder_layers
from stillroom.models.load import load_model
from stillroom.run.folder import write_atomic


@dataclass
class PruneResult:
    """The written folder, one row per decoder layer (original numbering) plus the rest, and the totals."""

    folder: Path
    rows: list[dict]
    params_before: int
    params_after: int
    details: dict = field(default_factory=dict)


def output_folder(cfg: RunConfig) -> Path:
    """``prune.out`` or ``<output_dir>/<name>/pruned``."""
    return Path(cfg.prune.out).expanduser() if cfg.prune.out else cfg.run_dir / "pruned"


def _needs_calibration(cfg: RunConfig) -> bool:
    p = cfg.prune
    return (p.depth is not None and p.depth.strategy != "last_n") or p.width is not None or (
        p.sparsity is not None and p.sparsity.method in ("wanda", "sparsegpt"))


def _check_targets(model: nn.Module, cfg: RunConfig) -> None:
    """Refuse what the loaded model cannot do, before any work (errors name the key and the model's value)."""
    p = cfg.prune
    if p.depth is not None:
        check_depth(model, p.depth)
    if p.width is not None:
        check_width(model, p.width)
    if p.sparsity is not None:
        from stillroom.compress.sparsity import plan_targets

        plan_targets(model, p.sparsity)


def _layer_counts(model: nn.Module) -> list[tuple[int, int]]:
    """Per decoder layer: (parameters, zero weights)."""
    return [(sum(q.numel() for q in layer.parameters()), sum(int((q == 0).sum()) for q in layer.parameters()))
            for layer in decoder_layers(model)]


def _params(model: nn.Module) -> int:
    return sum(q.numel() for q in model.parameters())  # tied weights are one parameter: counted once


def report_rows(before: list[int], origin: list[int], model: nn.Module, rest_before: int) -> list[dict]:
    """One row per original layer (``params_after`` 0 when dropped; ``kept_as`` its new index) and one for
    embeddings, final norm and head (``rest``)."""
    after = _layer_counts(model)
    new_index = {i: j for j, i in enumerate(origin)}
    rows = []
    for i, n_before in enumerate(before):
        j = new_index.get(i)
        n_after, zeros = after[j] if j is not None else (0, 0)
        rows.append({"module": f"layers.{i}", "kept_as": j, "params_before": n_before, "params_after": n_after,
                     "zeros": zeros, "sparsity": zeros / n_after if n_after else 0.0})
    rest = _params(model) - sum(n for n, _ in after)
    rest_zeros = sum(int((q == 0).sum()) for name, q in model.named_parameters() if ".layers." not in f".{name}")
    rows.append({"module": "embeddings+norm+head", "kept_as": None, "params_before": rest_before,
                 "params_after": rest, "zeros": rest_zeros, "sparsity": rest_zeros / rest if rest else 0.0})
    return rows


def prune(cfg: RunConfig, *, log: Callable[[str], None] = print) -> PruneResult:
    """Prune ``cfg.prune.model`` (default the teacher) as ``cfg.prune`` says and write the folder."""
    p = cfg.prune
    if p.depth is None and p.width is None and p.sparsity is None:
        raise PruneTargetError("prune: nothing to do; set prune.depth, prune.width or prune.sparsity")
    out = output_folder(cfg)
    if out.exists() and not p.overwrite:
        raise FileExistsError(f"prune.out: {out} exists; choose another prune.out or set prune.overwrite=true")
    loaded = load_model(p.model or cfg.teacher.model, torch.float32, cfg.cache_dir)
    model = loaded.model.to(torch.device(p.device)).eval()
    _check_targets(model, cfg)
    calibration = None
    if _needs_calibration(cfg):
        sources = p.calibration.sources or cfg.data.sources
        held = cfg.data.heldout_fraction if p.calibration.sources is None else 0.0  # never the run's held-out text
        calibration = calibration_batches(loaded.tokenizer, sources, seq_len=p.calibration.seq_len,
                                          batches=p.calibration.batches, batch_size=p.calibration.batch_size,
                                          seed=cfg.seed, exclude_heldout_fraction=held)
    params_before, counts_before = _params(model), [n for n, _ in _layer_counts(model)]
    rest_before = params_before - sum(counts_before)
    model, details = apply_prunings(model, cfg, calibration, log)
    rows = report_rows(counts_before, details["kept_layers"], model, rest_before)
    result = PruneResult(out, rows, params_before, _params(model), details)
    write_folder(model, loaded.tokenizer, result, source=loaded.identity)
    log(f"pruned {loaded.identity}: {result.params_before:,} -> {result.params_after:,} parameters "
        f"({result.params_after / result.params_before:.1%}); {summary_line(details)}; folder {out}")
    return result


def apply_prunings(model: nn.Module, cfg: RunConfig, calibration: list[torch.Tensor] | None,
                   log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """depth -> width -> sparsity; returns the pruned model and what was kept (for the report)."""
    p = cfg.prune
    details: dict = {"kept_layers": list(range(len(decoder_layers(model))))}
    if p.depth is not None:
        model, kept, scores = prune_depth(model, p.depth, calibration)
        details.update(kept_layers=kept, depth_strategy=p.depth.strategy, **scores)
        log(f"depth ({p.depth.strategy}): kept layers {kept}")
    if p.width is not None:
        model, plan = prune_width(model, p.width, calibration)
        c = model.config
        details["width"] = {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                            "intermediate_size": c.intermediate_size, "hidden_size": c.hidden_size,
                            "kept_heads": plan.heads, "kept_kv_heads": plan.kv_heads}
        log(f"width: heads {c.num_attention_heads}/{c.num_key_value_heads} kv, mlp {c.intermediate_size}, "
            f"hidden {c.hidden_size}")
    if p.sparsity is not None:
        from stillroom.compress.sparsity import sparsify

        details["sparsity_rows"] = sparsify(model, p.sparsity, calibration, log=log)
    return model, details


def summary_line(details: dict) -> str:
    width = details.get("width")
    parts = [f"{len(details['kept_layers'])} layers"]
    if width:
        parts.append(f"hidden {width['hidden_size']}, {width['num_attention_heads']} heads, mlp {width['intermediate_size']}")
    if "sparsity_rows" in details:
        rows = details["sparsity_rows"]
        parts.append(f"{sum(r['zeros'] for r in rows) / max(1, sum(r['numel'] for r in rows)):.1%} of pruned linears zero")
    return ", ".join(parts)


def write_folder(model: nn.Module, tokenizer, result: PruneResult, *, source: str) -> None:
    """Model (safetensors) + tokenizer + reports under ``<folder>.tmp``, then renamed to ``folder``."""
    out = result.folder
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report = {"source": source, "params_before": result.params_before, "params_after": result.params_after,
                  **result.details, "rows": result.rows}
        write_atomic(tmp / "prune_report.json", json.dumps(report, indent=2) + "\n")
        write_atomic(tmp / "prune_report.md", report_markdown(report))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def report_markdown(report: dict) -> str:
    """The report as a Markdown table (one row per original layer, then the rest, then the totals)."""
    lines = [f"# Prune report\n\nsource: `{report['source']}`\n",
             f"parameters: {report['params_before']:,} -> {report['params_after']:,} "
             f"({report['params_after'] / report['params_before']:.1%})\n",
             "| module | kept as | params before | params after | zeros | sparsity |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        dropped = r["kept_as"] is None and r["module"].startswith("layers.")
        kept = "dropped" if dropped else ("" if r["kept_as"] is None else r["kept_as"])
        lines.append(f"| {r['module']} | {kept} | {r['params_before']:,} | {r['params_after']:,} | {r['zeros']:,} "
                     f"| {r['sparsity']:.1%} |")
    return "\n".join(lines) + "\n"
