"""Runs a user can trust, through the real CLI: a run name is never reused silently, a finished run is not
run again, a refused --resume changes nothing, `stillroom eval` uses the run's saved config, and the start-up
phases carry timestamps."""

import json
import re
import shutil
import statistics

import pytest
from cli_helpers import stillroom
from helpers import file_hashes

QUICK = ["eval.generations=0", "eval.speed_tokens=32"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def _checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def _ckpt_run_id(folder):
    return json.loads((folder / "train_state.json").read_text())["run_id"]


def test_a_used_run_name_is_refused_and_overwrite_starts_it_again(recipe_factory, tmp_path):
    recipe = recipe_factory(train={"steps": 4, "save_every": 1, "keep_checkpoints": 2})
    run_dir = tmp_path / "runs" / "x"
    stillroom("run", str(recipe), "name=x", *QUICK)
    (run_dir / "teacher_store").mkdir()  # what cache-teacher wrote for this run: kept by --overwrite
    (run_dir / "teacher_store" / "manifest.json").write_text("{}")
    old = file_hashes(run_dir)

    proc = stillroom("run", str(recipe), "name=x", "train.steps=3", *QUICK, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(run_dir) in proc.stderr and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert file_hashes(run_dir) == old  # nothing touched
    old_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    # A run with fewer steps used to keep the old step 4, delete its own step 3 and point `latest` at nothing.
    stillroom("run", str(recipe), "name=x", "train.steps=3", "--overwrite", *QUICK)
    assert _checkpoints(run_dir) == ["step_000002", "step_000003"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]
    new_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert new_id != old_id
    assert {_ckpt_run_id(run_dir / "checkpoints" / c) for c in _checkpoints(run_dir)} == {new_id}
    assert (run_dir / "teacher_store" / "manifest.json").read_text() == "{}"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # nothing left aside


def test_resume_refuses_a_checkpoint_of_another_run(recipe_factory, tmp_path):
    recipe = recipe_factory(train={"steps": 4, "save_every": 2})
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    stillroom("run", str(recipe), "name=a", "eval.before=false", *QUICK)
    stillroom("run", str(recipe), "name=b", "eval.before=false", *QUICK)
    shutil.rmtree(a / "checkpoints" / "step_000004")
    shutil.copytree(b / "checkpoints" / "step_000004", a / "checkpoints" / "step_000004")  # another run's
    before = file_hashes(a)

    proc = stillroom("run", str(recipe), "name=a", "train.steps=6", "--resume", "eval.before=false", *QUICK,
                     check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    ids = [json.loads((d / "run.json").read_text())["run_id"] for d in (a, b)]
    assert ids[0] != ids[1] and ids[0] in proc.stderr and ids[1] in proc.stderr
    assert "step_000004" in proc.stderr
    assert file_hashes(a) == before


def test_resume_of_a_finished_run_changes_nothing_and_raised_steps_continue_it(recipe_factory, tmp_path):
    recipe = recipe_factory(train={"steps": 4, "save_every": 2}, eval={"heldout_sequences": 4, "batch_size": 4,
                                                                      "generations": 1, "max_new_tokens": 4,
                                                                      "speed_tokens": 32})
    run_dir = tmp_path / "runs" / "x"
    stillroom("run", str(recipe), "name=x")
    first = _report(run_dir)
    done = file_hashes(run_dir)

    out = stillroom("run", str(recipe), "name=x", "--resume")
    assert "finished" in out.stdout and "train.steps" in out.stdout
    assert "eval " not in out.stdout
    assert file_hashes(run_dir) == done  # report, metrics, students, checkpoints: as they were

    out = stillroom("run", str(recipe), "name=x", "--resume", "train.steps=7")
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert "eval teacher" not in out.stdout and "eval student_before" not in out.stdout  # not evaluated again
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    after = _report(run_dir)
    trained = after["student_after"]
    assert trained["steps"] == 7
    assert trained["median_step_s"] == pytest.approx(statistics.median(r["step_s"] for r in rows))
    assert trained["final_train_loss"] == pytest.approx(rows[-1]["loss"])
    assert trained["train_seconds"] == pytest.approx(rows[-1]["train_s"], abs=0.01)
    assert trained["train_seconds"] > first["student_after"]["train_seconds"]  # the whole run, not the last part
    for key in ("teacher", "student_before"):
        assert after[key]["heldout_ce"] == first[key]["heldout_ce"]
    assert after["generations"]["teacher"] == first["generations"]["teacher"]


def test_a_refused_resume_fails_before_loading_and_changes_nothing(recipe_factory, tmp_path):
    recipe = recipe_factory(train={"steps": 4, "save_every": 2})
    run_dir = tmp_path / "runs" / "x"
    stillroom("run", str(recipe), "name=x", "eval.before=false", *QUICK)
    before = file_hashes(run_dir)

    proc = stillroom("run", str(recipe), "name=x", "--resume", "data.sources.0.limit=20",
                     "train.micro_batch_size=2", "train.steps=6", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "data.sources.0.limit 40 -> 20" in err and "train.micro_batch_size 4 -> 2" in err
    assert "train.steps 4 -> 6" in err  # a safe change, listed as such
    assert str(run_dir / "config.resolved.yaml") in err and "name=" in err
    assert "teacher:" not in proc.stdout and "eval " not in proc.stdout  # nothing loaded, nothing evaluated
    assert file_hashes(run_dir) == before


def test_eval_uses_the_saved_config_and_keeps_the_training_figures(recipe_factory, tmp_path):
    recipe = recipe_factory()  # eval.heldout_sequences: 8
    run_dir = tmp_path / "runs" / "x"
    stillroom("run", str(recipe), "name=x", "eval.heldout_sequences=4", *QUICK)
    trained = _report(run_dir)
    config = (run_dir / "config.resolved.yaml").read_text()

    out = stillroom("eval", str(recipe), "name=x", *QUICK)
    again = _report(run_dir)
    for key in ("teacher", "student_after"):  # the run's held-out set, not the recipe's
        assert again[key]["tokens"] == trained[key]["tokens"]
        assert again[key]["heldout_ce"] == pytest.approx(trained[key]["heldout_ce"], abs=1e-6)
    assert f"using {run_dir / 'config.resolved.yaml'}" in out.stdout

    out = stillroom("eval", str(recipe), "name=x", "eval.heldout_sequences=2", *QUICK)
    assert "overriding eval.heldout_sequences 4 -> 2" in out.stdout
    fewer = _report(run_dir)
    assert fewer["student_after"]["tokens"] < trained["student_after"]["tokens"]
    for figure in ("train_seconds", "steps", "final_train_loss", "median_step_s", "median_teacher_s"):
        assert fewer["student_after"][figure] == trained["student_after"][figure], figure
    assert fewer["teacher"]["trainable_params"] == 0
    assert (run_dir / "config.resolved.yaml").read_text() == config

    proc = stillroom("eval", str(recipe), "name=nothing", check=False)
    assert proc.returncode == 2
    assert str(tmp_path / "runs" / "nothing") in proc.stderr and "config.resolved.yaml" in proc.stderr


def test_start_up_phases_are_logged_with_the_elapsed_time(recipe_factory, tmp_path):
    recipe = recipe_factory(baseline=True)
    out = stillroom("run", str(recipe), "name=x", *QUICK)
    stamped = [re.match(r"\[\s*(\d+\.\d) s\] (.*)", line) for line in out.stdout.splitlines()]
    lines = [(float(m.group(1)), m.group(2)) for m in stamped if m]
    times = [t for t, _ in lines]
    assert times == sorted(times)
    text = [msg for _, msg in lines]
    for phase in ("teacher: loading", "data:", "student:", "vocabulary:", "building the kd training job",
                  "evaluating before training", "training:", "baseline:", "evaluating after training", "report:"):
        assert any(msg.startswith(phase) for msg in text), (phase, out.stdout)
