"""The classifier domain end to end through the real CLI: the shipped recipe (shortened) with its report,
the teacher cache, SIGKILL + ``--resume``, and ``stillroom eval``."""

import json

import pytest
from cli_helpers import assert_same_losses, completed_checkpoints, stillroom, stillroom_sigkilled, stillroom_torchrun

SHORT = ["classifier.teacher.steps=60", "train.steps=40", "train.warmup_steps=4", "train.eval_every=20",
         "train.save_every=10", "train.keep_checkpoints=2"]
METRICS = ("accuracy", "top1_agreement", "ece", "kl_teacher_student", "heldout_ce", "params", "trainable_params",
           "images_per_s")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier_cache")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache):
    """The shipped recipe, shortened: trains the teacher into ``cache``, the KD student and the baseline."""
    out = tmp_path_factory.mktemp("runs")
    proc = stillroom("run", "classifier_digits", f"output_dir={out}", f"cache_dir={cache}", *SHORT)
    return out, proc


def _args(out, cache, *more):
    return ("classifier_digits", f"output_dir={out}", f"cache_dir={cache}", *SHORT, *more)


def test_shipped_recipe_runs_and_reports(first_run, cache):
    out, proc = first_run
    run_dir = out / "classifier_digits"
    assert "teacher: training mlp [256, 256]" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "student_before", "student_after", "baseline"):
        for metric in METRICS:
            assert isinstance(report[key][metric], (int, float)), (key, metric)
    assert report["teacher"]["top1_agreement"] == 1.0 and report["teacher"]["kl_teacher_student"] == 0.0
    assert report["teacher"]["params"] > 20 * report["student_after"]["params"]
    assert report["student_after"]["accuracy"] > report["student_before"]["accuracy"] + 0.3
    assert len(report["student_after"]["confusion_matrix"]) == 10
    assert sum(map(sum, report["student_after"]["confusion_matrix"])) == report["student_after"]["examples"]
    assert report["student_after"]["steps"] == report["baseline"]["steps"] == 40
    md = (run_dir / "report.md").read_text()
    assert "| model | accuracy | top-1 agree | ECE |" in md and "![confusion_matrix.png](confusion_matrix.png)" in md
    for name in ("confusion_matrix.png", "loss_curves.png", "metrics_bars.png", "student/model.safetensors",
                 "student/config.json", "baseline/student/model.safetensors", "checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40 and "eval/accuracy" in records[19]  # train.eval_every
    cached = [p for p in (cache / "classifiers").iterdir()]
    assert len(cached) == 1 and (cached[0] / "teacher.json").is_file() and (cached[0] / "metrics.jsonl").is_file()


def test_teacher_cache_is_reused(first_run, cache):
    out, _ = first_run
    proc = stillroom("run", *_args(out, cache, "name=again", "baseline=false", "train.steps=5"))
    assert "teacher: cached classifier" in proc.stdout and "teacher: training" not in proc.stdout
    first = json.loads((out / "classifier_digits" / "report.json").read_text())["teacher"]
    again = json.loads((out / "again" / "report.json").read_text())["teacher"]
    assert again["accuracy"] == first["accuracy"] and again["heldout_ce"] == first["heldout_ce"]
    assert len(list((cache / "classifiers").iterdir())) == 1


def test_eval_reevaluates_the_run(first_run, cache):
    out, _ = first_run
    run_dir = out / "classifier_digits"
    before = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.json").unlink()
    (run_dir / "confusion_matrix.png").unlink()
    proc = stillroom("eval", *_args(out, cache))
    assert "eval student_after" in proc.stdout and "eval baseline" in proc.stdout
    after = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "confusion_matrix.png").is_file()
    for key in ("teacher", "student_before", "student_after", "baseline"):
        for metric in ("accuracy", "top1_agreement", "ece", "kl_teacher_student", "heldout_ce"):
            assert after[key][metric] == pytest.approx(before[key][metric], abs=1e-6), (key, metric)


def test_sigkill_then_resume_matches_uninterrupted(first_run, cache):
    """Killed after its first checkpoint and resumed, the run logs the losses of the uninterrupted first run,
    whose teacher was trained in the same process (so that must not have moved the run's random state)."""
    out, _ = first_run
    run_dir = out / "killed"
    stillroom_sigkilled("run", *_args(out, cache, "name=killed"), when=lambda: completed_checkpoints(run_dir))
    done = completed_checkpoints(run_dir)
    assert done and "step_000040" not in str(done[-1])

    resumed = stillroom("run", *_args(out, cache, "name=killed"), "--resume")
    assert "resumed from" in resumed.stdout and "teacher: cached classifier" in resumed.stdout
    full = out / "classifier_digits"
    assert_same_losses(run_dir, full, abs=1e-6, steps=40)
    assert_same_losses(run_dir / "baseline", full / "baseline", abs=1e-6)
    a, b = (json.loads((d / "report.json").read_text())["student_after"] for d in (run_dir, full))
    assert a["accuracy"] == b["accuracy"] and a["heldout_ce"] == pytest.approx(b["heldout_ce"], abs=1e-6)


@pytest.mark.multiproc
def test_two_processes_match_one(first_run, cache):
    """torchrun with 2 processes of 32 images each logs the losses of the 1-process run with 64."""
    out, _ = first_run
    stillroom_torchrun("run", *_args(out, cache, "name=two", "train.micro_batch_size=32"))
    one, two = out / "classifier_digits", out / "two"
    assert_same_losses(two, one, abs=1e-5, steps=40)
    assert_same_losses(two / "baseline", one / "baseline", abs=1e-5)
