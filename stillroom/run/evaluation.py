"""``stillroom eval``: re-evaluate a finished run's students against the teacher and rewrite the report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.config.schema import RunConfig
from stillroom.run.report import write_run_report
from stillroom.run.training import prepare_run


def evaluate_run(cfg: RunConfig, *, student_dir: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Evaluate the run folder's student (or ``student_dir``) and baseline; rewrite the report."""
    prep, _ = prepare_run(cfg, log=log)
    folder = Path(student_dir) if student_dir else cfg.run_dir / "student"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained student in {folder}: run `stillroom run` first, or pass --student PATH to a model folder"
        )
    models = {"teacher": (prep.teacher_model, prep.data.heldout)} if prep.teacher_model is not None else {}
    if cfg.eval.before:
        models["student_before"] = (prep.student, prep.data.heldout)
    models["student_after"] = (prep.load_model(folder), prep.data.heldout)
    baseline_dir = cfg.run_dir / "baseline" / "student"
    if student_dir is None and (baseline_dir / "config.json").is_file():
        models["baseline"] = (prep.load_model(baseline_dir), prep.data.baseline_heldout)
    results = prep.evaluate(models, log)
    files = {cfg.method: cfg.run_dir / "metrics.jsonl", "baseline": cfg.run_dir / "baseline" / "metrics.jsonl"}
    write_run_report(prep, results, files, log=log)
    return cfg.run_dir
