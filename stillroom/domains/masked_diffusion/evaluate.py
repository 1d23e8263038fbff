"""What the masked-diffusion report measures: accuracy against decoding steps on the held-out prompts.

Per model, every held-out prompt is decoded (:mod:`.sampling`) with the slow sampler at each
``eval.tokens_per_step`` and with the entropy-threshold decoder at each ``eval.thresholds`` entry. Each setting
gives a row of ``decoding``: mean steps (forward passes per answer), tokens per step (``R / mean steps``), token
accuracy and exact-match rate (:meth:`~.task.MdTask.score`). The report's table shows:

* ``accuracy`` / ``exact_match``: the slow sampler at one token per step (``R`` steps: the model's best decoding);
* ``threshold_accuracy`` / ``threshold_exact_match`` / ``tokens_per_step`` / ``decode_steps``: the threshold
  decoder at ``eval.threshold``.

``decoding.md`` (written with the report) lays the rows of every model side by side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from stillroom.config.masked_diffusion import MaskedDiffusionConfig
from stillroom.domains.masked_diffusion.sampling import decode, slow_rule, threshold_rule
from stillroom.domains.masked_diffusion.task import MdSplits

DECODING_FILE = "decoding.md"
LABELS = {"teacher": "base model", "student_before": "student (before)", "student_after": "dParallel student",
          "baseline": "CE-only self-distillation"}


def decoding_rows(model: nn.Module, sec: MaskedDiffusionConfig, data: MdSplits, device: torch.device) -> list[dict]:
    """One row per decoder setting (see the module docstring)."""
    prompts = data.heldout_prompts()
    settings = [("slow", float(k), slow_rule(k)) for k in sec.eval.tokens_per_step]
    settings += [("threshold", float(t), threshold_rule(t)) for t in sec.eval.thresholds]
    rows = []
    for decoder, value, rule in settings:
        out = decode(model, data.task, prompts, sec.block_size, rule, batch_size=sec.eval.batch_size, device=device)
        token_acc, exact = data.task.score(prompts, out.answers)
        rows.append({"decoder": decoder, "setting": value, "steps": float(out.steps.double().mean()),
                     "tokens_per_step": out.tokens_per_step(), "accuracy": token_acc, "exact_match": exact})
    return rows


def model_metrics(model: nn.Module, sec: MaskedDiffusionConfig, data: MdSplits, device: torch.device) -> dict:
    """The report's metrics of one model: the headline numbers and the ``decoding`` rows."""
    rows = decoding_rows(model, sec, data, device)
    slow = _row(rows, "slow", 1.0) or _row(rows, "slow", float(min(sec.eval.tokens_per_step)))
    thr = _row(rows, "threshold", float(sec.eval.threshold))
    if thr is None:
        out = decode(model, data.task, data.heldout_prompts(), sec.block_size, threshold_rule(sec.eval.threshold),
                     batch_size=sec.eval.batch_size, device=device)
        token_acc, exact = data.task.score(data.heldout_prompts(), out.answers)
        thr = {"steps": float(out.steps.double().mean()), "tokens_per_step": out.tokens_per_step(),
               "accuracy": token_acc, "exact_match": exact}
    return {"accuracy": slow["accuracy"], "exact_match": slow["exact_match"],
            "threshold_accuracy": thr["accuracy"], "threshold_exact_match": thr["exact_match"],
            "tokens_per_step": thr["tokens_per_step"], "decode_steps": thr["steps"],
            "params": sum(p.numel() for p in model.parameters()), "eval_prompts": len(data.heldout), "decoding": rows}


def _row(rows: list[dict], decoder: str, value: float) -> dict | None:
    return next((r for r in rows if r["decoder"] == decoder and r["setting"] == value), None)


def decoding_markdown(models: dict[str, dict]) -> str:
    """The accuracy-vs-steps table of every model that has ``decoding`` rows."""
    lines = ["# Accuracy against decoding steps (held-out prompts)", "",
             "| model | decoder | setting | mean steps | tokens/step | token accuracy | exact match |",
             "|---|---|---|---|---|---|---|"]
    for key, metrics in models.items():
        for r in metrics.get("decoding") or []:
            setting = f"{int(r['setting'])} tok/step" if r["decoder"] == "slow" else f"entropy < {r['setting']:g}"
            lines.append(f"| {LABELS.get(key, key)} | {r['decoder']} | {setting} | {r['steps']:.2f} | "
                         f"{r['tokens_per_step']:.2f} | {r['accuracy']:.4f} | {r['exact_match']:.4f} |")
    return "\n".join(lines) + "\n"


def write_decoding(run_dir: Path) -> Path:
    """``decoding.md`` in the run folder from its ``report.json`` (written atomically)."""
    report = json.loads((run_dir / "report.json").read_text())
    models = report.get("models") or {k: v for k, v in report.items() if isinstance(v, dict) and "decoding" in v}
    path = run_dir / DECODING_FILE
    tmp = run_dir / f".{DECODING_FILE}.tmp"
    tmp.write_text(decoding_markdown(models))
    os.replace(tmp, path)
    return path
