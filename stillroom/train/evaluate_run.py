"""``stillroom eval``: re-evaluate a finished run's students against the teacher and rewrite the report."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from stillroom.config.schema import RunConfig
from stillroom.train.evaluation import evaluate_models, write_run_report
from stillroom.train.run import prepare


def evaluate_run(cfg: RunConfig, *, student_dir: str | None = None) -> Path:
    p = prepare(cfg)
    folder = Path(student_dir) if student_dir else p.run_dir / "student"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained student in {folder}: run `stillroom run` first, or pass --student PATH to a HF model folder"
        )
    models = {"teacher": p.teacher_model}
    if cfg.eval.before:
        models["student_before"] = p.student
    models["student_after"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    baseline_dir = p.run_dir / "baseline" / "student"
    if student_dir is None and (baseline_dir / "config.json").is_file():
        models["baseline"] = AutoModelForCausalLM.from_pretrained(baseline_dir, dtype=torch.float32)
    results = evaluate_models(p, models)
    files = {cfg.method: p.run_dir / "metrics.jsonl", "baseline": p.run_dir / "baseline" / "metrics.jsonl"}
    write_run_report(p, results, files)
    return p.run_dir
