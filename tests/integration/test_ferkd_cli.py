"""FerKD through the real CLI: ``stillroom cache-teacher`` on the cluttered digits, then ``stillroom run`` with
``method: ferkd`` (SelfMix on); and FerKD with nothing calibrated or dropped equal to plain store-fed KD (the
dense, marginal-smoothed targets against the library's top-k path, with k = C)."""

import json

import pytest
from cli_helpers import run_losses, stillroom

SHORT = ["classifier.teacher.steps=30", "train.steps=6", "train.warmup_steps=1", "baseline=false",
         "eval.before=false", "classifier.store.views_per_image=4", "classifier.store.k=10",
         "classifier.store.logprob_dtype=float32"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    args = ["ferkd_cluttered", f"output_dir={out}", f"cache_dir={cache}", *SHORT, f"classifier.store.path={out}/store"]
    stillroom("cache-teacher", *args)
    return out, args


def test_ferkd_run_with_selfmix_writes_its_region_report(written):
    out, args = written
    proc = stillroom("run", *args, "name=ferkd", "ferkd.selfmix=true", "ferkd.discard_top_frac=0.25",
                     "train.eval_every=3")
    assert "ferkd: keep_soft" in proc.stdout
    regions = json.loads((out / "ferkd" / "ferkd_regions.json").read_text())
    assert regions["views_per_image"] == 4
    counts = {k: regions[k]["views"] for k in ("keep_soft", "calibrate", "discard")}
    assert counts["discard"] == counts["calibrate"] == regions["images"]  # floor(0.25 * 4) = 1 of each per image
    assert regions["discard"]["mean_c_r"] > regions["keep_soft"]["mean_c_r"] > regions["calibrate"]["mean_c_r"]
    rows = [json.loads(x) for x in (out / "ferkd" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and all(0 < r["ferkd/selfmix_lambda"] <= 1 for r in steps)
    assert all(r["ferkd/discard_frac"] + r["ferkd/calibrate_frac"] + r["ferkd/keep_soft_frac"] == pytest.approx(1)
               for r in steps)
    assert json.loads((out / "ferkd" / "report.json").read_text())["student_after"]["accuracy"] > 0


def test_ferkd_without_calibration_or_drops_equals_store_fed_kd(written):
    out, args = written
    stillroom("run", *args, "name=kd", "method=kd", "ferkd=null")
    stillroom("run", *args, "name=plain", "ferkd.calibrate_bottom_frac=0", "ferkd.discard_top_frac=0")
    assert run_losses(out / "plain") == pytest.approx(run_losses(out / "kd"), abs=1e-5)
