"""The mae domain through the real CLI: plain MAE pre-training (theta_0), DMAE with its MAE-only baseline,
self-distillation for further pre-training from theta_0, and the converted encoder fine-tuned by an ordinary
classifier run (classifier.student_path)."""

import json

import pytest
from cli_helpers import stillroom

TINY = ["mae.student.hidden_size=16", "mae.student.layers=2", "mae.student.decoder_hidden_size=16",
        "mae.student.decoder_layers=1", "mae.probe_images_per_class=20", "mae.probe_max_iter=200",
        "train.steps=6", "train.micro_batch_size=32", "train.warmup_steps=1", "train.precision=fp32",
        "train.keep_checkpoints=1", "train.log_every=3"]
TEACHER = ["mae.teacher.arch.hidden_size=32", "mae.teacher.arch.layers=3", "mae.teacher.arch.decoder_hidden_size=16",
           "mae.teacher.arch.decoder_layers=1", "mae.teacher.steps=8", "mae.teacher.batch_size=32"]


@pytest.fixture(scope="module")
def theta0(tmp_path_factory):
    """A plain MAE pre-training run (method sft): its student/ is theta_0 of the other tests."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    stillroom("run", "dmae_digits", "name=theta0", "method=sft", "dmae=null", "baseline=false", "eval.before=false",
              f"output_dir={out}", f"cache_dir={cache}", *TINY)
    return out / "theta0", cache


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_plain_mae_pretraining_saves_mae_and_classifier_folders(theta0):
    run_dir, _ = theta0
    assert json.loads((run_dir / "student" / "config.json").read_text())["model_type"] == "vit_mae"
    assert json.loads((run_dir / "student_classifier" / "config.json").read_text())["model_type"] == "vit"
    row = _report(run_dir)["student_after"]
    assert row["mae_loss"] > 0 and 0 <= row["probe_accuracy"] <= 1 and "teacher_blocks_run" not in row


def test_dmae_recipe_with_its_mae_only_baseline(tmp_path, theta0):
    _, cache = theta0
    proc = stillroom("run", "dmae_digits", f"output_dir={tmp_path}", f"cache_dir={cache}", *TINY, *TEACHER)
    assert "dmae: aligning (student block, teacher block) [(1, 2)]" in proc.stdout
    report = _report(tmp_path / "dmae_digits")
    for key in ("teacher", "student_before", "student_after", "baseline"):
        assert {"mae_loss", "probe_accuracy", "params", "encoder_params"} <= set(report[key]), key
    # the teacher (3 blocks) runs blocks 0..2 on [CLS] + 4 visible patches of 16
    assert report["student_after"]["teacher_blocks_run"] == 3 and report["student_after"]["teacher_tokens"] == 5
    metrics = [json.loads(line) for line in (tmp_path / "dmae_digits" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/feat_1_2" in m for m in metrics)


def test_self_distill_fpt_from_theta0(tmp_path, theta0):
    run_dir, cache = theta0
    stillroom("run", "self_distill_fpt_digits", f"output_dir={tmp_path}", f"cache_dir={cache}",
              f"mae.student_path={run_dir / 'student'}", f"mae.teacher.init_path={run_dir / 'student'}",
              "mae.teacher.steps=8", "baseline=false", "eval.before=false", *TINY[4:])
    report = _report(tmp_path / "self_distill_fpt_digits")
    assert report["student_after"]["teacher_blocks_run"] == 2  # the whole teacher, on all 1 + 16 tokens
    assert report["student_after"]["teacher_tokens"] == 17
    assert json.loads((tmp_path / "self_distill_fpt_digits" / "student" / "config.json").read_text())["norm_pix_loss"]


def test_mae_encoder_finetunes_through_a_classifier_run(tmp_path, theta0):
    run_dir, cache = theta0
    folder = run_dir / "student_classifier"
    proc = stillroom("run", "classifier_digits", "name=finetune", "method=sft", f"output_dir={tmp_path}",
                     f"cache_dir={cache}", f"classifier.student_path={folder}", "classifier.train_images_per_class=10",
                     "classifier.teacher.steps=10", "train.steps=5", "train.warmup_steps=1", "baseline=false")
    assert f"loaded from {folder}" in proc.stdout
    assert 0 <= _report(tmp_path / "finetune")["student_after"]["accuracy"] <= 1


def test_kd_is_refused_before_training(tmp_path):
    proc = stillroom("run", "dmae_digits", "method=kd", "dmae=null", f"output_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "domain: mae takes method" in proc.stdout + proc.stderr
