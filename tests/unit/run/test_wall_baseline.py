"""The equal-wall-time CE baseline: its step rule, the timings it is measured from, its record in run.json, the
resume check that counts it, and its row and comparison lines in the report."""

import json

import pytest

from stillroom.config.load import ConfigError, load_config
from stillroom.eval.report import write_report
from stillroom.run import folder as rf
from stillroom.run import wall_baseline as wb


def _metrics(path, step_seconds, *, steps=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = steps or range(1, len(step_seconds) + 1)
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "step_s": t}) + "\n"
                            for s, t in zip(steps, step_seconds)))


def test_wall_steps_is_the_floor_of_kd_seconds_over_the_ce_step_and_never_below_the_kd_steps():
    assert wb.wall_steps(kd_seconds=302.0, ce_seconds=176.0, ce_steps=40, kd_steps=40) == 68  # 302 / 4.4 = 68.6
    assert wb.wall_steps(kd_seconds=44.0, ce_seconds=44.0, ce_steps=10, kd_steps=10) == 10
    assert wb.wall_steps(kd_seconds=30.0, ce_seconds=60.0, ce_steps=10, kd_steps=10) == 10  # CE slower: still 10
    with pytest.raises(ValueError, match="timed step"):
        wb.wall_steps(kd_seconds=30.0, ce_seconds=0.0, ce_steps=10, kd_steps=10)


def test_step_seconds_sums_each_step_once_and_scales_sparse_logs(tmp_path):
    _metrics(tmp_path / "a.jsonl", [1.0, 2.0, 3.0])
    assert wb.step_seconds(tmp_path / "a.jsonl", 3) == pytest.approx(6.0)
    # step 2 logged again by a resumed session: its last record counts, once
    _metrics(tmp_path / "b.jsonl", [1.0, 2.0, 9.0, 3.0], steps=[1, 2, 2, 3])
    assert wb.step_seconds(tmp_path / "b.jsonl", 3) == pytest.approx(13.0)
    # log_every=2 over 4 steps: the mean logged step times 4
    _metrics(tmp_path / "c.jsonl", [2.0, 4.0], steps=[2, 4])
    assert wb.step_seconds(tmp_path / "c.jsonl", 4) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="no timed step"):
        wb.step_seconds(tmp_path / "missing.jsonl", 3)


def test_decide_records_the_choice_and_reuses_it_until_train_steps_change(tmp_path):
    rf.write_run_json(tmp_path, {"run_id": "r1"})
    _metrics(tmp_path / "metrics.jsonl", [3.0] * 4)           # KD: 12 s
    _metrics(tmp_path / "baseline" / "metrics.jsonl", [1.0] * 4)  # CE: 1 s per step
    first = wb.decide(tmp_path, 4, log=lambda _: None)
    assert first == {"steps": 12, "kd_steps": 4, "kd_train_seconds": 12.0, "ce_steps": 4, "ce_train_seconds": 4.0}
    assert rf.read_run_json(tmp_path)["run_id"] == "r1"  # the rest of run.json is kept
    _metrics(tmp_path / "baseline" / "metrics.jsonl", [2.0] * 4)  # another session's timing: not decided again
    assert wb.decide(tmp_path, 4, log=lambda _: None)["steps"] == 12
    assert wb.recorded(tmp_path, 6) is None  # train.steps raised: decided again
    _metrics(tmp_path / "metrics.jsonl", [3.0] * 6)
    _metrics(tmp_path / "baseline" / "metrics.jsonl", [2.0] * 6)
    assert wb.decide(tmp_path, 6, log=lambda _: None)["steps"] == 9
    assert "9 steps = floor(18.0 s" in wb.note(tmp_path)[0]


def test_the_option_needs_the_equal_steps_baseline():
    with pytest.raises(ConfigError, match="baseline_wall_time: true needs baseline: true"):
        load_config(None, ["baseline_wall_time=true"])
    assert load_config(None, ["baseline=true", "baseline_wall_time=true"]).baseline_wall_time


def _checkpoint(folder, step, run_id="r1"):
    ckpt = folder / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    (ckpt / "COMPLETE").write_text("")


def test_a_resumed_run_is_finished_only_when_the_wall_baseline_reached_its_recorded_steps(tmp_path):
    resolved = "name: x\n"
    (tmp_path / rf.CONFIG).write_text(resolved)
    (tmp_path / "report.json").write_text("{}")
    rf.write_run_json(tmp_path, {"run_id": "r1"})
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path / "baseline", 4)
    check = dict(steps=4, baseline=True)
    assert rf.check_resume(tmp_path, resolved, **check).finished
    assert not rf.check_resume(tmp_path, resolved, **check, wall_steps=0).finished  # not decided yet
    _checkpoint(tmp_path / wb.FOLDER, 7)
    assert not rf.check_resume(tmp_path, resolved, **check, wall_steps=9).finished
    _checkpoint(tmp_path / wb.FOLDER, 9)
    state = rf.check_resume(tmp_path, resolved, **check, wall_steps=9)  # past train.steps=4: its own steps count
    assert state.finished and state.step == 4


def test_the_report_has_a_row_and_a_line_for_each_baseline(tmp_path):
    row = {"heldout_ce": 4.6, "kl_teacher_student": 2.0, "top1_agreement": 0.30, "steps": 40}
    models = {"teacher": {"heldout_ce": 3.1, "kl_teacher_student": 0.0, "top1_agreement": 1.0},
              "student_after": row,
              "baseline": {"heldout_ce": 4.7, "kl_teacher_student": 2.4, "top1_agreement": 0.26, "steps": 40},
              "baseline_wall": {"heldout_ce": 4.5, "kl_teacher_student": 2.1, "top1_agreement": 0.29, "steps": 68}}
    gens = {k: ["text"] for k in ("teacher", "student_after", "baseline", "baseline_wall")}
    report = write_report(tmp_path, models, generations=gens, prompts=["p"], layout="lm")
    md = (tmp_path / "report.md").read_text()
    assert "| baseline (CE, equal wall time, 68 steps) | 4.5000 |" in md
    assert "| baseline (CE only) | 4.7000 |" in md
    assert ("student (after) − CE baseline at equal steps (40 steps): heldout_ce -0.1000, kl_teacher_student "
            "-0.4000, top1_agreement +4.0 points") in md
    assert ("student (after) − CE baseline at equal wall time (68 steps): heldout_ce +0.1000, kl_teacher_student "
            "-0.1000, top1_agreement +1.0 points") in md
    assert report["summary"]["heldout_ce_after_minus_baseline_wall"] == pytest.approx(0.1)
    assert report["baseline_wall"]["steps"] == 68
    assert "| prompt | teacher | student (after) | baseline (CE only) | baseline (CE, equal wall time, 68 steps) |" in md
