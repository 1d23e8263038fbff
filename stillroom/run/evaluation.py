"""``stillroom eval``: re-evaluate a finished run's students against the teacher and rewrite the report.

The run is evaluated as it was trained: with its saved ``config.resolved.yaml``, changed only by the overrides
given on the command line (each one is printed), never by the recipe's current settings. The rewritten report
keeps the run's training figures (from the old report.json, else from metrics.jsonl). Nothing but the report
is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from stillroom.config.load import ConfigError, dump_config, load_config
from stillroom.config.schema import RunConfig
from stillroom.run import folder as rf
from stillroom.run import wall_baseline as wb
from stillroom.run.report import write_run_report
from stillroom.run.training import prepare_run, resolve_auto, timed

KEPT_FROM_TRAINING = (*rf.TRAINING_FIGURES, "trainable_params")
"""What the rewritten report keeps of a trained model's row: how it was trained (a saved student loaded for
evaluation has every parameter trainable, LoRA adapters merged)."""


def saved_config(cfg: RunConfig, overrides: list[str], log: Callable[[str], None]) -> RunConfig:
    """The run's saved config (of the folder ``cfg`` names) with ``overrides`` applied; logs what they change."""
    run_dir = cfg.run_dir
    path = run_dir / rf.CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {rf.CONFIG}: it holds no run started by `stillroom run` (or it is "
                          f"not the run folder you meant: check name= and output_dir=)")
    saved = load_config(path, list(overrides))
    saved.name, saved.output_dir = cfg.name, cfg.output_dir  # the folder is where it was found
    resolve_auto(saved)
    changes = [c for c in rf.config_changes(yaml.safe_load(path.read_text()), yaml.safe_load(dump_config(saved)))
               if c.key not in ("name", "output_dir")]
    log(f"eval: using {path}" + ("; overriding " + "; ".join(str(c) for c in changes) if changes else
                                 " (no setting overridden)"))
    return saved


def evaluate_run(cfg: RunConfig, *, overrides: list[str] = (), student_dir: str | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Evaluate the run folder's student (or ``student_dir``) and baseline with the run's saved config (plus
    ``overrides``); rewrite the report."""
    log = timed(log)
    cfg = saved_config(cfg, overrides, log)
    folder = Path(student_dir) if student_dir else cfg.run_dir / "student"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained student in {folder}: run `stillroom run` first, or pass --student PATH to a model folder"
        )
    prep, _ = prepare_run(cfg, log=log)
    models = {"teacher": (prep.teacher_model, prep.data.heldout)} if prep.teacher_model is not None else {}
    if cfg.eval.before:
        models["student_before"] = (prep.student, prep.data.heldout)
    models["student_after"] = (prep.load_model(folder), prep.data.heldout)
    baseline_dir = cfg.run_dir / "baseline" / "student"
    if student_dir is None and (baseline_dir / "config.json").is_file():
        models["baseline"] = (prep.load_model(baseline_dir), prep.data.baseline_heldout)
    wall_dir = cfg.run_dir / wb.FOLDER / "student"  # the equal-wall-time baseline, as trained (run.json's steps)
    if student_dir is None and (wall_dir / "config.json").is_file():
        models[wb.ROW] = (prep.load_model(wall_dir), prep.data.baseline_heldout)
    log(f"evaluating {', '.join(models)}")
    results = prep.evaluate(models, log)
    files = {cfg.method: cfg.run_dir / "metrics.jsonl", "baseline": cfg.run_dir / "baseline" / "metrics.jsonl",
             wb.ROW: cfg.run_dir / wb.FOLDER / "metrics.jsonl"}
    trained = {"student_after": files[cfg.method], "baseline": files["baseline"], wb.ROW: files[wb.ROW]}
    for key, figures in _training_rows(cfg.run_dir, trained).items():
        if key in results and not (key == "student_after" and student_dir):
            results[key].update(figures)
    write_run_report(prep, results, files, cards=student_dir is None, log=log)  # another folder: not this run's
    return cfg.run_dir


def _training_rows(run_dir: Path, metrics_files: dict[str, Path]) -> dict[str, dict]:
    """The training figures of the trained models (``{row: its metrics.jsonl}``): from the old report.json, else
    from their metrics.jsonl."""
    old = {}
    if (run_dir / "report.json").is_file():
        try:
            old = json.loads((run_dir / "report.json").read_text()).get("models") or {}
        except json.JSONDecodeError:
            old = {}
    rows = {}
    for key, file in metrics_files.items():
        kept = {k: v for k, v in (old.get(key) or {}).items() if k in KEPT_FROM_TRAINING}
        rows[key] = kept if "steps" in kept else {**rf.training_figures(file), **kept}
    return rows
