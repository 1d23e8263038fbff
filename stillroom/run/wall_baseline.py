"""The CE baseline at equal wall time (``baseline_wall_time: true``): how many steps it trains, decided once.

A KD step costs more than a CE step (the teacher's forward), so the equal-steps baseline has had less compute
than the student it is compared with. The second baseline (folder ``baseline_wall/``, report row
``baseline_wall``) trains the same initial student with CE for

    steps = max(train.steps, floor(kd_seconds / (ce_seconds / ce_steps)))

where ``kd_seconds`` is the method's summed step seconds and ``ce_seconds`` the equal-steps baseline's (from
their ``metrics.jsonl``: training only, no evaluation or checkpoint time). The choice and both times are
recorded in ``run.json`` under :data:`RECORD`, so that ``--resume`` and ``stillroom eval`` reuse it rather than
deciding again from another session's timings; it is decided again only when ``train.steps`` changed.

Where the learning rate of the first ``train.steps`` steps does not depend on the run's length (``train.schedule:
constant``), the first ``train.steps`` steps of this baseline are exactly the equal-steps baseline (the same
initial student, data order, seed and learning rates), so it continues that baseline from its last checkpoint
instead of training them again (:func:`continues_baseline`, :func:`seed_from_baseline`): the same weights, a
third less training in the quickstart. With a decaying schedule the two runs part at the first step after the
warm-up, and the baseline trains from the initial student.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

from stillroom.files import write_atomic
from stillroom.run import folder as rf
from stillroom.train.checkpoint import checkpoint_step, latest_checkpoint
from stillroom.train.loop import lr_factor

FOLDER = "baseline_wall"
"""The equal-wall-time baseline's folder in the run folder (checkpoints, metrics.jsonl, student/)."""
ROW = "baseline_wall"
"""Its row in report.json / report.md (a variant of ``baseline``: :func:`stillroom.eval.report.base_model`)."""
RECORD = "baseline_wall_time"
"""Its key in ``run.json``: ``{"steps", "kd_steps", "kd_train_seconds", "ce_steps", "ce_train_seconds"}``."""


def wall_steps(kd_seconds: float, ce_seconds: float, ce_steps: int, kd_steps: int) -> int:
    """CE steps that fit in ``kd_seconds``: ``floor(kd_seconds / (ce_seconds / ce_steps))``, at least
    ``kd_steps`` (the equal-wall-time baseline never trains less than the equal-steps one)."""
    if ce_steps < 1 or ce_seconds <= 0:
        raise ValueError(f"the CE baseline's timing is {ce_seconds} s over {ce_steps} steps; it needs at least one "
                         f"timed step")
    return max(kd_steps, math.floor(kd_seconds * ce_steps / ce_seconds))


def step_seconds(metrics_file: Path, steps: int) -> float:
    """The summed step seconds of a run's ``steps`` steps from its ``metrics.jsonl`` (``step_s``; a step logged
    twice, by a session that was killed and resumed, counts once: its last record). Where not every step was
    logged (``train.log_every`` > 1), the logged steps' mean times ``steps``."""
    rows: dict[int, float] = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if isinstance(record.get("step_s"), (int, float)) and isinstance(record.get("step"), int):
                rows[record["step"]] = float(record["step_s"])
    rows = {s: t for s, t in rows.items() if s <= steps}
    if not rows:
        raise ValueError(f"{metrics_file}: no timed step (step_s) to measure the equal-wall-time baseline with; "
                         f"the run's training must log its steps (train.log_every) before this baseline is decided")
    total = sum(rows.values())
    return total if len(rows) == steps else total / len(rows) * steps


def recorded(run_dir: Path, kd_steps: int) -> dict | None:
    """The choice recorded in ``run.json`` for a run of ``kd_steps`` steps (``None``: none, or made for another
    ``train.steps``)."""
    record = rf.read_run_json(run_dir).get(RECORD)
    if isinstance(record, dict) and record.get("kd_steps") == kd_steps and isinstance(record.get("steps"), int):
        return record
    return None


def decide(run_dir: Path, kd_steps: int, log: Callable[[str], None]) -> dict:
    """The recorded choice of ``run_dir`` (reused), or a new one measured from the method's and the equal-steps
    baseline's ``metrics.jsonl`` and written into ``run.json``."""
    kept = recorded(run_dir, kd_steps)
    if kept is not None:
        log(f"baseline at equal wall time: {kept['steps']} steps, as recorded in {run_dir / rf.RUN_JSON}")
        return kept
    kd_seconds = step_seconds(run_dir / "metrics.jsonl", kd_steps)
    ce_seconds = step_seconds(run_dir / "baseline" / "metrics.jsonl", kd_steps)
    record = {"steps": wall_steps(kd_seconds, ce_seconds, kd_steps, kd_steps), "kd_steps": kd_steps,
              "kd_train_seconds": round(kd_seconds, 3), "ce_steps": kd_steps, "ce_train_seconds": round(ce_seconds, 3)}
    rf.write_run_json(run_dir, {**rf.read_run_json(run_dir), RECORD: record})
    log(f"baseline at equal wall time: {record['steps']} steps = floor({kd_seconds:.1f} s of {kd_steps} training "
        f"steps / {ce_seconds / kd_steps:.2f} s per CE step), at least {kd_steps} (recorded in run.json)")
    return record


def note(run_dir: Path) -> list[str]:
    """The report's note on the choice (none without a record)."""
    record = rf.read_run_json(run_dir).get(RECORD)
    if not isinstance(record, dict):
        return []
    per_step = record["ce_train_seconds"] / record["ce_steps"]
    return [f"baseline (CE, equal wall time): {record['steps']} steps = floor({record['kd_train_seconds']:.1f} s "
            f"summed over the student's {record['kd_steps']} training steps / {per_step:.2f} s per step of the "
            f"equal-steps CE baseline), at least {record['kd_steps']}; training seconds only (no evaluation or "
            f"checkpoint time), recorded in run.json"]


def continues_baseline(train, steps: int) -> bool:
    """Whether a ``steps``-step run's first ``train.steps`` learning rates are the ``train.steps``-step run's:
    then the equal-wall-time baseline may continue the equal-steps one (``train``: the run's ``TrainConfig``)."""
    longer = train.model_copy(update={"steps": steps})
    return all(lr_factor(s, train) == lr_factor(s, longer) for s in range(train.steps))


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (a checkpoint of the student and its optimizer is hundreds of MB), or a copy where the file
    system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def seed_from_baseline(run_dir: Path, kd_steps: int) -> Path | None:
    """Start ``baseline_wall/`` from the equal-steps baseline's checkpoint of step ``kd_steps`` and its first
    ``kd_steps`` metrics records (so its training seconds count those steps), each copied atomically; the
    baseline's folder is not changed. Returns the checkpoint copied, or ``None`` (nothing copied) where
    ``baseline_wall/`` already has a checkpoint (a resumed run: it goes on from its own) or the baseline has
    none of step ``kd_steps``."""
    ours = run_dir / FOLDER / "checkpoints"
    theirs = latest_checkpoint(run_dir / "baseline" / "checkpoints")
    if latest_checkpoint(ours) is not None or theirs is None or checkpoint_step(theirs) != kd_steps:
        return None
    ours.mkdir(parents=True, exist_ok=True)
    tmp, copy = ours / f".tmp-{theirs.name}-copy", ours / theirs.name
    for stale in (tmp, copy):  # an incomplete copy of an interrupted session (no "latest" points at it)
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(theirs, tmp, copy_function=_link_or_copy)  # checkpoint files are never written again
    os.replace(tmp, copy)
    write_atomic(ours / "latest", theirs.name)
    records = [line for line in (run_dir / "baseline" / "metrics.jsonl").read_text().splitlines()
               if line.strip() and json.loads(line).get("step", 0) <= kd_steps]
    write_atomic(run_dir / FOLDER / "metrics.jsonl", "".join(line + "\n" for line in records))
    return copy
