"""``stillroom run RECIPE`` on a multi-stage recipe: run its stages in order, resumably, with one report.

The record ``<output_dir>/<name>/stages.json`` (written atomically after every change) holds, per stage, its
status (``started`` / ``complete``), its fingerprint (its resolved config chained with the earlier stages'),
its output, wall time and key numbers; ``stages.md`` shows them side by side.

* A new pipeline refuses a folder where any stage's output or the record exists (nothing is touched), unless
  told ``--overwrite`` (every stage then replaces its output) or ``--resume``.
* ``--resume`` skips a complete stage whose fingerprint is unchanged and whose output exists; a complete stage
  whose config (or an earlier stage's) changed is refused before anything runs; an unfinished run stage
  continues through the run command's own ``--resume`` (which compares its config.resolved.yaml); an
  unfinished prune/merge/transfer stage is done again (their outputs are written atomically).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from stillroom.config.load import ConfigError
from stillroom.config.stages import PlannedStage, StagesPlan, config_tree
from stillroom.run.folder import run_files, write_atomic

Log = Callable[[str], None]
RECORD, REPORT_MD = "stages.json", "stages.md"
RUN_NUMBERS = ("heldout_ce", "kl_teacher_student", "top1_agreement", "params")
"""A run stage's numbers, from its report.json's ``student_after`` row."""


def run_stages(plan: StagesPlan, *, resume: bool = False, overwrite: bool = False, log: Log = print) -> Path:
    """Run every stage of ``plan`` in order; returns ``<output_dir>/<name>`` (holding stages.md)."""
    if resume and overwrite:
        raise ConfigError("give --resume (continue the stages) or --overwrite (redo every stage), not both")
    root = plan.root
    record = read_record(root) if resume else {}
    todo = _check_start(plan, record, resume=resume, overwrite=overwrite)
    precheck(plan, log)
    record = {"name": plan.config.name, "recipe": plan.origin, "stages": record.get("stages", {})}
    if overwrite:
        record["stages"] = {}
    for stage in plan.stages:
        if stage.name not in todo:
            log(f"stage {stage.name} ({stage.kind}): complete, skipped (output {stage.output})")
            continue
        record["stages"][stage.name] = _entry(stage, "started")
        write_record(root, record, plan)
        log(f"stage {stage.name} ({stage.kind}): {stage.label} -> {stage.output}")
        t0 = time.perf_counter()
        _execute(stage, resume=resume and not todo[stage.name], overwrite=overwrite or todo[stage.name], log=log)
        entry = _entry(stage, "complete", seconds=round(time.perf_counter() - t0, 2))
        entry["numbers"] = stage_numbers(stage)
        record["stages"][stage.name] = entry
        write_record(root, record, plan)
    log(f"stages complete: {root / REPORT_MD}")
    return root


def _check_start(plan: StagesPlan, record: dict, *, resume: bool, overwrite: bool) -> dict[str, bool]:
    """The stages to run, each with whether its output is replaced (True) or its run resumed (False); refuses
    (changing nothing) a used folder without --resume/--overwrite, and on --resume a complete stage whose
    fingerprint changed."""
    if overwrite:
        return {s.name: True for s in plan.stages}
    if not resume:
        used = [f"{s.label}: {s.output}" for s in plan.stages if _holds_output(s)]
        if (plan.root / RECORD).exists() or used:
            raise ConfigError(
                f"{plan.root} already holds these stages ({'; '.join(used) or RECORD}); nothing was changed. "
                "Continue with --resume, redo every stage with --overwrite, or choose another name (name=...)")
        return {s.name: False for s in plan.stages}
    todo: dict[str, bool] = {}
    done = record.get("stages", {})
    for stage in plan.stages:
        entry = done.get(stage.name, {})
        complete = entry.get("status") == "complete" and stage.output.exists()
        if complete and entry.get("fingerprint") != stage.fingerprint:
            changed = _changed_keys(entry.get("config"), config_tree(stage.config))
            what = f"its settings changed: {', '.join(changed[:6])}" if changed else "an earlier stage's settings changed"
            raise ConfigError(
                f"--resume: {stage.label} finished with another config ({what}); nothing was changed. Restore the "
                f"recipe, or redo the stages with --overwrite")
        if todo:  # after a stage that runs again, every later stage is done again from its new inputs
            todo[stage.name] = True
        elif not complete:  # unfinished (or its output is gone): resume it, or redo it where it finished
            todo[stage.name] = entry.get("status") == "complete"
    return todo


def precheck(plan: StagesPlan, log: Log) -> None:
    """``check_run`` (files and settings) of every run/prune stage that reads no earlier stage's output, so a
    missing data file of stage 3 stops the pipeline before stage 1 runs."""
    from stillroom.run.checks import check_run

    for stage in plan.stages:
        if stage.kind in ("run", "prune") and not stage.uses:
            try:
                check_run(stage.config, log=log)
            except ConfigError as err:
                raise ConfigError(f"{stage.label}: {err}") from None


def _changed_keys(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees (empty when ``old`` is unknown)."""
    if old is None:
        return []
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _holds_output(stage: PlannedStage) -> bool:
    if stage.kind == "run":
        return bool(run_files(stage.folder))
    return stage.output.exists()


def _execute(stage: PlannedStage, *, resume: bool, overwrite: bool, log: Log) -> None:
    """Call the stage's command with its resolved config."""
    cfg = stage.config
    if stage.kind == "run":
        from stillroom.run.training import run

        run(cfg, resume=resume and not overwrite, overwrite=overwrite, log=log)
        return
    redo = overwrite or resume  # an unfinished prune/merge/transfer is done again from the start
    if stage.kind == "prune":
        from stillroom.compress.prune import prune

        if redo:
            cfg.prune.overwrite = True
        prune(cfg, log=log)
        return
    if redo:
        cfg.overwrite = True
    if stage.kind == "merge":
        from stillroom.compress.merge import merge

        merge(cfg, log=log)
    else:
        from stillroom.compress.transfer import transfer

        transfer(cfg, log=log)


def stage_numbers(stage: PlannedStage) -> dict:
    """The stage's key numbers for the report: a run stage's held-out figures (report.json), a prune stage's
    parameters and sparsity (prune_report.json), a merge's tensor count, a transfer's scale."""
    if stage.kind == "run":
        report = _read_json(stage.folder / "report.json")
        models = report.get("models", {})
        row = models.get("student_after", {})
        numbers = {k: row[k] for k in RUN_NUMBERS if k in row}
        if "heldout_ce" in models.get("teacher", {}):
            numbers["teacher_heldout_ce"] = models["teacher"]["heldout_ce"]
        return numbers
    if stage.kind == "prune":
        report = _read_json(stage.output / "prune_report.json")
        numbers = {k: report[k] for k in ("params_before", "params_after") if k in report}
        rows = report.get("rows") or []
        zeros, total = sum(r.get("zeros", 0) for r in rows), sum(r.get("params_after", r.get("numel", 0)) for r in rows)
        if zeros and total:
            numbers["sparsity"] = zeros / total
        return numbers
    if stage.kind == "merge":
        summary = _read_json(stage.output / "stillroom_merge.json")
        return {k: summary[k] for k in ("t", "tensors", "lerp_fallbacks") if k in summary}
    return {"scale": stage.config.scale}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _entry(stage: PlannedStage, status: str, seconds: float | None = None) -> dict:
    return {"index": stage.index, "kind": stage.kind, "status": status, "fingerprint": stage.fingerprint,
            "folder": str(stage.folder), "output": str(stage.output), "uses": stage.uses, "seconds": seconds,
            "numbers": {}, "config": config_tree(stage.config)}


def read_record(root: Path) -> dict:
    path = root / RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: unreadable ({err}); redo the stages with --overwrite") from None
    return data if isinstance(data, dict) else {}


def write_record(root: Path, record: dict, plan: StagesPlan) -> None:
    """``stages.json`` and ``stages.md``, each atomically."""
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / RECORD, json.dumps(record, indent=2) + "\n")
    write_atomic(root / REPORT_MD, stages_markdown(record, plan))


def stages_markdown(record: dict, plan: StagesPlan) -> str:
    """One table of all stages: kind, status, output, wall time and key numbers side by side."""
    keys: list[str] = []
    for entry in record["stages"].values():
        keys += [k for k in entry.get("numbers", {}) if k not in keys]
    lines = [f"# Stages of `{record['name']}`", "", f"Recipe: `{record['recipe']}`.", "",
             "| " + " | ".join(["stage", "kind", "status", "uses", "seconds", *keys, "output"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for stage in plan.stages:
        entry = record["stages"].get(stage.name)
        if entry is None:
            lines.append(f"| {stage.name} | {stage.kind} | not run | {', '.join(stage.uses) or '-'} | - | "
                         + "- | " * len(keys) + f"`{stage.output}` |")
            continue
        cells = [_cell(entry.get("numbers", {}).get(k)) for k in keys]
        seconds = "-" if entry.get("seconds") is None else f"{entry['seconds']:.1f}"
        lines.append(f"| {stage.name} | {stage.kind} | {entry['status']} | {', '.join(entry['uses']) or '-'} | "
                     f"{seconds} | " + "".join(f"{c} | " for c in cells) + f"`{entry['output']}` |")
    return "\n".join(lines + _models_table(record, plan)) + "\n"


MODEL_COLUMNS = ("heldout_ce", "bits_per_byte", "kl_teacher_student", "top1_agreement", "tokens_per_s", "params")
MODEL_ROWS = (("student_after", "student"), ("baseline", "baseline (CE only)"),
              ("baseline_wall", "baseline (CE only, equal wall time)"))


def _models_table(record: dict, plan: StagesPlan) -> list[str]:
    """Every model of the finished run stages side by side (each stage's report.json), the teacher first: e.g.
    the same model pruned two ways, each recovered by KD and by CE alone."""
    rows, teacher = [], None
    for stage in plan.stages:
        entry = record["stages"].get(stage.name)
        if stage.kind != "run" or entry is None or entry["status"] != "complete":
            continue
        models = _read_json(stage.folder / "report.json").get("models", {})
        teacher = teacher or models.get("teacher")
        rows += [(f"{stage.name}: {label}", models[key]) for key, label in MODEL_ROWS if models.get(key)]
    if not rows:
        return []
    rows = ([("teacher", teacher)] if teacher else []) + rows
    columns = [c for c in MODEL_COLUMNS if any(r.get(c) is not None for _, r in rows)]
    out = ["", "## Models", "", "Held-out numbers from each run stage's report (`<stage>/report.json`).", "",
           "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    out += [f"| {name} | " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for name, r in rows]
    return out


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe(plan: StagesPlan) -> list[str]:
    """One line per stage for ``stillroom validate``."""
    lines = []
    for s in plan.stages:
        what = f"method {s.config.method}, {s.config.train.steps} steps" if s.kind == "run" else s.kind
        uses = f", uses {', '.join(s.uses)}" if s.uses else ""
        lines.append(f"  {s.label}: {what}{uses} -> {s.output}")
    return lines
