"""``baseline_wall_time: true`` through the real CLI: the second CE baseline trains the recorded number of steps
with a schedule over its own steps, has its row in the report, and --resume and `stillroom eval` reuse the
recorded choice instead of measuring again."""

import json

import pytest
from cli_helpers import stillroom

from stillroom.config.core import TrainConfig
from stillroom.run import folder as rf
from stillroom.train.loop import lr_factor

NO_BEFORE = ["eval.before=false"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_equal_wall_time_baseline_is_recorded_reported_and_reused(recipe_factory, tmp_path):
    recipe = recipe_factory(baseline=True, baseline_wall_time=True)
    out = stillroom("run", str(recipe), *NO_BEFORE).stdout
    run_dir = tmp_path / "runs" / "tiny"
    record = rf.read_run_json(run_dir)["baseline_wall_time"]
    kd = sum(r["step_s"] for r in _rows(run_dir / "metrics.jsonl"))
    ce = sum(r["step_s"] for r in _rows(run_dir / "baseline" / "metrics.jsonl"))
    assert record["kd_train_seconds"] == pytest.approx(kd, abs=1e-3)
    assert record["ce_train_seconds"] == pytest.approx(ce, abs=1e-3)
    assert record["steps"] == max(6, int(kd / (ce / 6)))
    assert f"baseline at equal wall time: {record['steps']} steps = floor(" in out
    wall = _rows(run_dir / "baseline_wall" / "metrics.jsonl")
    assert [r["step"] for r in wall] == list(range(1, record["steps"] + 1))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["baseline_wall"]["steps"] == record["steps"]
    assert f"| baseline (CE, equal wall time, {record['steps']} steps) |" in (run_dir / "report.md").read_text()
    assert (run_dir / "baseline_wall" / "student" / "config.json").is_file()

    # A recorded choice is what a resumed run trains to, whatever this session would measure: pretend the
    # run stopped before its report, with 3 more equal-wall-time steps recorded than it trained.
    steps = record["steps"] + 3
    rf.write_run_json(run_dir, {**rf.read_run_json(run_dir), "baseline_wall_time": {**record, "steps": steps}})
    (run_dir / "report.json").unlink()
    out = stillroom("run", str(recipe), "--resume", *NO_BEFORE).stdout
    assert f"baseline at equal wall time: {steps} steps, as recorded" in out
    wall = _rows(run_dir / "baseline_wall" / "metrics.jsonl")
    assert [r["step"] for r in wall][-3:] == [steps - 2, steps - 1, steps]
    tc = TrainConfig(steps=steps, warmup_steps=2, lr=1e-3)  # the recipe's schedule, over the recorded steps
    assert wall[-2]["lr"] == pytest.approx(1e-3 * lr_factor(steps - 1, tc), rel=1e-6)
    assert json.loads((run_dir / "report.json").read_text())["baseline_wall"]["steps"] == steps

    out = stillroom("run", str(recipe), "--resume", *NO_BEFORE).stdout
    assert "is finished" in out  # every folder at its steps: nothing to do
    stillroom("eval", str(recipe), *NO_BEFORE)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["baseline_wall"]["steps"] == steps
    assert "heldout_ce_after_minus_baseline_wall" in report["summary"]


def _wall_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "baseline_wall" / "student" / "model.safetensors"))


def test_with_a_constant_schedule_it_continues_the_equal_steps_baseline_to_the_same_weights(
        recipe_factory, tmp_path, monkeypatch):
    """Its first train.steps steps would repeat the equal-steps baseline exactly, so it continues that baseline's
    checkpoint; the weights equal those of training every step again (same step count forced on both runs)."""
    import torch

    from stillroom.config.load import load_config
    from stillroom.run import training
    from stillroom.run import wall_baseline as wb

    monkeypatch.setattr(wb, "wall_steps", lambda *a, **k: 9)
    recipe = recipe_factory(baseline=True, baseline_wall_time=True,
                            train={"schedule": "constant", "steps": 6, "warmup_steps": 2})
    lines = []
    continued = training.run(load_config(recipe, ["eval.before=false", "name=continued"]), log=lines.append)
    assert any("continues the equal-steps baseline from" in line for line in lines)
    assert any("resumed from" in line and "step_000006" in line for line in lines)
    wall, base = _rows(continued / "baseline_wall" / "metrics.jsonl"), _rows(continued / "baseline" / "metrics.jsonl")
    assert [r["step"] for r in wall] == list(range(1, 10))
    assert [r["loss"] for r in wall[:6]] == [r["loss"] for r in base]  # its first steps are the baseline's records
    assert json.loads((continued / "report.json").read_text())["baseline_wall"]["steps"] == 9

    monkeypatch.setattr(wb, "continues_baseline", lambda *a: False)  # every step trained again
    lines = []
    fresh = training.run(load_config(recipe, ["eval.before=false", "name=fresh"]), log=lines.append)
    assert not any("continues the equal-steps baseline" in line for line in lines)
    a, b = _wall_weights(continued), _wall_weights(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_decaying_schedule_does_not_continue_the_baseline():
    from stillroom.run import wall_baseline as wb

    assert wb.continues_baseline(TrainConfig(steps=40, warmup_steps=4, schedule="constant"), 62)
    assert not wb.continues_baseline(TrainConfig(steps=40, warmup_steps=4, schedule="cosine"), 62)
    assert not wb.continues_baseline(TrainConfig(steps=40, warmup_steps=4, schedule="linear"), 62)
    assert wb.continues_baseline(TrainConfig(steps=40, warmup_steps=4, schedule="cosine"), 40)  # nothing to add
