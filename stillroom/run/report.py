"""The run's report: the evaluated models, their training figures and curves, and the domain's notes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.domains import PreparedRun
from stillroom.eval import write_report


def write_run_report(prep: PreparedRun, models: dict, metrics_files: dict[str, Path], *,
                     log: Callable[[str], None] = print) -> dict:
    """``report.json`` / ``report.md`` / plots in the run folder from ``models`` (name -> metrics)."""
    generations = {k: v.pop("generations") for k, v in models.items() if "generations" in v}
    prompts = next((v.pop("prompts") for v in models.values() if "prompts" in v), None)
    for v in models.values():
        v.pop("prompts", None)
    cfg = prep.cfg
    report = write_report(
        cfg.run_dir, models, generations=generations or None, prompts=prompts,
        metrics_files={k: f for k, f in metrics_files.items() if f.exists()},
        title=f"stillroom run `{cfg.name}` ({cfg.method})", notes=prep.report_notes(), layout=cfg.domain,
    )
    log(f"report: {cfg.run_dir / 'report.md'}")
    return report
