"""The run's report: the evaluated models, their training figures and curves, the data's bad records and the
domain's notes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.domains import PreparedRun
from stillroom.eval import write_report
from stillroom.run.wall_baseline import note as wall_note

BAD_RECORDS_SHOWN = 20
"""Bad records listed in report.md / report.json (``data.bad_records.first``); the count covers all of them."""


def write_run_report(prep: PreparedRun, models: dict, metrics_files: dict[str, Path], *, cards: bool = True,
                     log: Callable[[str], None] = print) -> dict:
    """``report.json`` / ``report.md`` / plots in the run folder from ``models`` (name -> metrics); ``cards``: an
    lm run's saved students (``student/``, ``baseline/student/``) get a model card with the report's table."""
    generations = {k: v.pop("generations") for k, v in models.items() if "generations" in v}
    prompts = next((v.pop("prompts") for v in models.values() if "prompts" in v), None)
    for v in models.values():
        v.pop("prompts", None)
    cfg = prep.cfg
    data = data_report(getattr(prep.data, "stats", None))
    report = write_report(
        cfg.run_dir, models, generations=generations or None, prompts=prompts,
        metrics_files={k: f for k, f in metrics_files.items() if f.exists()},
        title=f"stillroom run `{cfg.name}` ({cfg.method})", notes=prep.report_notes() + wall_note(cfg.run_dir),
        layout=_layout(cfg), data=data,
    )
    bad = (data or {}).get("bad_records", {})
    if bad.get("count"):
        first = f"; the first: {bad['first'][0]}" if bad["first"] else ""
        log(f"data: {bad['count']} bad record(s) were skipped{first} (report.md, section \"Bad records\", "
            f"lists the first {len(bad['first'])})")
    log(f"report: {cfg.run_dir / 'report.md'}")
    if cards and cfg.domain == "lm":
        from stillroom.eval.model_card import write_model_cards

        folders = {"student_after": cfg.run_dir / "student", "baseline": cfg.run_dir / "baseline" / "student"}
        report_md = (cfg.run_dir / "report.md").read_text(encoding="utf-8")
        for card in write_model_cards(cfg, report_md, {k: f for k, f in folders.items() if k in models}):
            log(f"model card: {card}")
    return report


def data_report(stats: dict | None) -> dict | None:
    """The report's ``data`` entry from the data pipeline's statistics (``None`` without them)."""
    if not isinstance(stats, dict) or "records_bad" not in stats:
        return None
    first = list(stats.get("bad_record_examples", []))[:BAD_RECORDS_SHOWN]
    return {"bad_records": {"count": int(stats["records_bad"]), "first": first}}


def _layout(cfg) -> str:
    """The report layout: the domain's, or ``lm_cross`` when the teacher reads other tokens (bits per byte
    compare the models; CE per token does not)."""
    return "lm_cross" if cfg.domain == "lm" and cfg.teacher.tokenizer_mode == "cross" else cfg.domain
