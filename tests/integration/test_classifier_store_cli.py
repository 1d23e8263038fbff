"""The image soft-label store through the real CLI: ``stillroom cache-teacher`` on the classifier recipe, a
store-fed run equal to the online run on the same crop views, and a store for other settings refused with the
command that rebuilds it."""

import json

import pytest
from cli_helpers import run_losses, stillroom

SHORT = ["classifier.teacher.steps=30", "train.steps=8", "train.warmup_steps=2", "baseline=false",
         "eval.before=false", "classifier.augment.enabled=true"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    store = out / "store"
    args = ["classifier_digits", f"output_dir={out}", f"cache_dir={cache}", *SHORT, f"classifier.store.path={store}"]
    proc = stillroom("cache-teacher", *args, "classifier.store.logprob_dtype=float32")
    return out, args, store, proc


def test_cache_teacher_writes_an_image_store(written):
    _, _, store, proc = written
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "images" and manifest["k"] == 10
    assert manifest["sequences"] == manifest["tokens"] > 1000 and manifest["views_per_image"] == 1
    assert "image soft-label store" in proc.stdout and "1 views" in proc.stdout
    hint = [line for line in proc.stdout.splitlines() if line.startswith("train from it with: ")]
    assert hint and hint[0].endswith("classifier.teacher_source=store")  # the classifier's key: works when pasted
    again = stillroom("cache-teacher", *written[1])  # the dtype left at its default: read from the manifest
    assert "already complete" in again.stdout and "classifier.store.logprob_dtype=float32" in again.stdout


def test_store_fed_run_equals_the_online_run(written):
    out, args, _, _ = written
    stillroom("run", *args, "name=online")
    proc = stillroom("run", *args, "name=stored", "classifier.teacher_source=store")
    assert "teacher: image soft-label store" in proc.stdout
    online, stored = run_losses(out / "online"), run_losses(out / "stored")
    assert len(online) == 8 and stored == pytest.approx(online, abs=1e-5)
    report = json.loads((out / "stored" / "report.json").read_text())
    assert report["teacher"]["top1_agreement"] == 1.0  # the report's teacher is the in-process one


def test_a_store_for_other_views_is_refused_with_the_rebuild_command(written):
    _, args, _, _ = written
    proc = stillroom("run", *args, "name=other", "classifier.teacher_source=store",
                     "classifier.augment.crop_scale=[0.5, 1.0]", check=False)
    assert proc.returncode != 0
    assert "crop_scale (store [0.35, 1.0], run [0.5, 1.0])" in proc.stderr
    assert "stillroom cache-teacher classifier_digits" in proc.stderr and "--overwrite" in proc.stderr


def test_validate_reads_the_image_store_manifest(written, tmp_path):
    _, args, store, _ = written
    proc = stillroom("validate", *args, "classifier.teacher_source=store")
    assert f"the run will read the teacher store in {store} (complete; k=10" in proc.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    proc = stillroom("validate", *args, "classifier.teacher_source=store", f"classifier.store.path={broken}",
                     check=False)
    assert proc.returncode == 2 and "classifier.store:" in proc.stderr and "manifest.json" in proc.stderr
    missing = stillroom("validate", *args, "classifier.teacher_source=store", f"classifier.store.path={tmp_path}/no",
                        check=False)
    assert missing.returncode == 0 and "not written yet: `stillroom cache-teacher classifier_digits" in missing.stdout
