"""The pretrained EfficientNet-Lite0 teacher through the real CLI, on the shipped recipe's tiny variant: a
``feature_kd`` run resumed after a kill equals the uninterrupted one, and ``stillroom cache-teacher`` pays for the
teacher once: the store-fed run equals the online run (k = classes, float32)."""

import json

import pytest
from cli_helpers import interrupted_copy, run_losses, stillroom

TINY = ["classifier.shapes.classes=3", "classifier.shapes.train_per_class=8", "classifier.shapes.heldout_per_class=4",
        "classifier.shapes.image_size=16", "classifier.teacher.pretrained.size=32",
        "classifier.teacher.pretrained.labels_per_class=2", "classifier.store.k=3",
        "classifier.store.logprob_dtype=float32", "classifier.eval_batch_size=16", "train.micro_batch_size=8",
        "train.warmup_steps=1", "train.threads=1"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")


def test_feature_kd_on_the_recipe_resumes_to_the_uninterrupted_losses(dirs):
    out, cache = dirs
    args = ["lite0_kd_shapes", f"output_dir={out}", f"cache_dir={cache}", *TINY, "method=feature_kd",
            "classifier.teacher_source=online", "train.steps=6", "train.save_every=3", "train.keep_checkpoints=3"]
    proc = stillroom("run", *args, "name=full")
    assert "feature_kd: student tap layer.2 (64) -> linear projector -> teacher features (1280)" in proc.stdout
    report = json.loads((out / "full" / "report.json").read_text())
    assert 0.0 <= report["teacher"]["accuracy"] <= 1.0 and "student_after" in report
    rows = [json.loads(line) for line in (out / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/feature"] > 0 for r in rows if "loss/feature" in r) and len(run_losses(out / "full")) == 6
    notes = (out / "full" / "report.md").read_text()
    assert "EfficientNet-Lite0 (ImageNet-1k, frozen, 32 px) + linear head 1280->3" in notes
    assert "held-out accuracy" in notes
    interrupted_copy(out / "full", out / "resumed", after_step=3, final_step=6)
    again = stillroom("run", *args, "name=resumed", "--resume")
    assert "resumed from" in again.stdout
    assert run_losses(out / "resumed") == pytest.approx(run_losses(out / "full"), abs=1e-6)


def test_cache_teacher_writes_the_pretrained_teachers_store_and_the_store_run_equals_the_online_run(dirs):
    out, cache = dirs
    store = out / "store"
    args = ["lite0_kd_shapes", f"output_dir={out}", f"cache_dir={cache}", *TINY, "train.steps=4",
            f"classifier.store.path={store}"]
    proc = stillroom("cache-teacher", *args)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "images" and manifest["sequences"] == 24
    assert "EfficientNet-Lite0" in manifest["teacher"]["identity"] and "image soft-label store" in proc.stdout
    stored = stillroom("run", *args, "name=stored")  # the recipe's teacher_source: store
    assert "teacher: image soft-label store" in stored.stdout
    stillroom("run", *args, "name=online", "classifier.teacher_source=online")
    assert run_losses(out / "stored") == pytest.approx(run_losses(out / "online"), abs=1e-5)
    feat = stillroom("run", *args, "name=feature_stored", "method=feature_kd")  # features online, logits stored
    assert "teacher: image soft-label store" in feat.stdout and len(run_losses(out / "feature_stored")) == 4
