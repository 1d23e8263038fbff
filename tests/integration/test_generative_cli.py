"""The generative domain through the real CLI: a denoiser teacher trained here once and cached, the student
trained with the denoising loss (sft) beside its baseline, the report with the teacher's step-count rows and
the sample plot, exact resume, and the checks that refuse bad input before step 0."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom

TINY = ["generative.train_points=512", "generative.heldout_points=128", "generative.teacher.steps=30",
        "generative.teacher.batch_size=64", "generative.teacher.arch.width=32", "generative.teacher.arch.depth=2",
        "generative.teacher.sample_steps=8", "generative.eval.samples_per_class=40", "generative.eval.projections=16",
        "train.micro_batch_size=32", "train.log_every=5", "train.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("generative_cache")


def _args(out, cache, *more):
    return ["generative_rings_sft", f"output_dir={out}", f"cache_dir={cache}", *TINY, *more]


def test_sft_run_with_baseline_writes_the_generative_report(tmp_path, cache):
    proc = stillroom("run", *_args(tmp_path, cache, "train.steps=6", "baseline=true"))
    assert "teacher: training mlp denoiser" in proc.stdout
    run_dir = tmp_path / "generative_rings_sft"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "teacher_1step", "teacher_4step", "student_before", "student_after", "baseline"):
        assert {"swd_data", "mode_precision", "mode_recall", "variance", "nfe", "samples_per_s"} <= set(report[key])
    assert report["teacher"]["nfe"] == 8 and report["teacher_4step"]["nfe"] == 4 and report["student_after"]["nfe"] == 1
    assert "swd_teacher" in report["student_after"] and "swd_teacher" not in report["teacher"]
    # the teacher at one step is the student before training: the same network, the same noise
    assert report["teacher_1step"]["swd_data"] == pytest.approx(report["student_before"]["swd_data"])
    md = (run_dir / "report.md").read_text()
    assert "| teacher (4step) |" in md and "samples.png" in md and (run_dir / "samples.png").is_file()
    assert (run_dir / "student" / "denoiser.json").is_file() and (run_dir / "baseline" / "student").is_dir()
    again = stillroom("run", *_args(tmp_path, cache, "train.steps=2", "name=again"))
    assert "teacher: cached denoiser" in again.stdout


def test_resume_continues_exactly(tmp_path, cache):
    const = ["train.schedule=constant", "train.warmup_steps=0", "train.save_every=5", "train.log_every=1",
             "eval.before=false"]
    stillroom("run", *_args(tmp_path, cache, "train.steps=10", "name=full", *const))
    stillroom("run", *_args(tmp_path, cache, "train.steps=5", "name=part", *const))
    resumed = stillroom("run", *_args(tmp_path, cache, "train.steps=10", "name=part", *const), "--resume")
    assert "resumed from" in resumed.stdout
    assert_same_losses(tmp_path / "part", tmp_path / "full", abs=1e-6, steps=10)


def test_bad_input_is_refused_before_training(tmp_path, cache):
    wrong = stillroom("run", *_args(tmp_path, cache, "generative.dataset=digits"), check=False)
    assert wrong.returncode != 0 and "generative.teacher.arch.kind=mlp takes points" in wrong.stderr
    missing = stillroom("run", *_args(tmp_path, cache, f"generative.teacher.path={tmp_path}"), check=False)
    assert missing.returncode != 0 and "is not a denoiser folder" in missing.stderr
    method = stillroom("run", *_args(tmp_path, cache, "method=kd"), check=False)
    assert method.returncode != 0 and "domain: generative takes method" in method.stderr


def test_image_run_reports_classifier_feature_metrics_and_a_grid(tmp_path, cache):
    """digits with a tiny UNet teacher: Fréchet distance, precision/recall and class accuracy in the features of a
    classifier trained here, and samples.png as a grid; the student folder loads with plain diffusers."""
    from diffusers import UNet2DModel

    stillroom("run", "generative_rings_sft", f"output_dir={tmp_path}", f"cache_dir={cache}", "name=digits",
              "generative.dataset=digits", "generative.teacher.arch.kind=unet", "generative.teacher.arch.channels=[8,16]",
              "generative.teacher.steps=3", "generative.teacher.batch_size=16", "generative.teacher.sample_steps=2",
              "generative.eval.samples_per_class=10", "generative.eval.teacher_steps=[1]",
              "generative.eval.feature_classifier_steps=20", "train.steps=2", "train.micro_batch_size=16")
    run_dir = tmp_path / "digits"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "teacher_1step", "student_before", "student_after"):
        row = report[key]
        assert {"frechet_distance", "precision", "recall", "class_accuracy", "nfe"} <= set(row) and "swd_data" not in row
        assert 0 <= row["class_accuracy"] <= 1 and row["frechet_distance"] >= 0
    assert (run_dir / "samples.png").is_file()
    UNet2DModel.from_pretrained(run_dir / "student")


def test_the_contrastive_term_trains_the_student_and_not_its_baseline(tmp_path, cache):
    stillroom("run", *_args(tmp_path, cache, "train.steps=4", "baseline=true", "name=contrast",
                            "generative.contrast.weight=0.5", "train.log_every=1", "eval.before=false"))
    run = tmp_path / "contrast"
    for row in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        assert row["loss"] == pytest.approx(row["loss/denoise"] + 0.5 * row["loss/contrast"], rel=1e-5)
    for row in (json.loads(line) for line in (run / "baseline" / "metrics.jsonl").read_text().splitlines()):
        assert "loss/contrast" not in row and row["loss"] == pytest.approx(row["loss/denoise"])
    refused = stillroom("run", *_args(tmp_path, cache, "method=dmd", "generative.contrast.weight=0.5",
                                      "name=refused"), check=False)
    assert refused.returncode != 0 and "generative.contrast.weight=0.5 adds a term" in refused.stderr


def test_steered_rows_sample_the_unconditional_teacher(tmp_path, cache):
    stillroom("run", *_args(tmp_path, cache, "train.steps=2", "name=steer", "generative.eval.steer_scale=1.0",
                            "eval.before=false"))
    report = json.loads((tmp_path / "steer" / "report.json").read_text())
    for row in ("teacher_uncond", "teacher_steered"):
        assert report[row]["nfe"] == 8 and 0.0 <= report[row]["mode_precision"] <= 1.0
    assert report["teacher_steered"]["mode_precision"] != report["teacher_uncond"]["mode_precision"]
    images = stillroom("run", *_args(tmp_path, cache, "generative.dataset=digits", "generative.teacher.arch.kind=unet",
                                     "generative.eval.steer_scale=1.0", "name=img"), check=False)
    assert images.returncode != 0 and "exact class posterior of a point toy" in images.stderr
