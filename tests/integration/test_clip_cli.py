"""The clip domain through the real CLI: a tiny CLIP trained contrastively from the shipped recipe, its folder
loaded by plain transformers (the classifier teacher kind clip on such a folder: tests/unit/domains/vl)."""

import json

import pytest
from clip_helpers import tiny_text_folder
from cli_helpers import stillroom

TINY = ["clip.datasets=[scenes,digits]", "clip.scenes_train=64", "clip.scenes_heldout=16", "clip.images_per_class=8",
        "clip.heldout_per_class=4", "clip.image_size=16", "clip.vision.hidden_size=16", "clip.vision.layers=1",
        "clip.projection_dim=16", "clip.retrieval_images=16", "train.steps=3", "train.micro_batch_size=32",
        "train.warmup_steps=1", "train.log_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    text = tiny_text_folder(tmp_path_factory.mktemp("text"))
    proc = stillroom("run", "clip_scenes", f"output_dir={out}", f"cache_dir={cache}", f"clip.text_path={text}", *TINY)
    return out / "clip_scenes", cache, proc


def test_clip_recipe_trains_reports_and_saves_a_transformers_folder(clip_run):
    from transformers import VisionTextDualEncoderModel

    run_dir, _, proc = clip_run
    assert "student: image tower CLIPVision d 16 x 1 blocks" in proc.stdout
    row = json.loads((run_dir / "report.json").read_text())["student_after"]
    for key in ("zero_shot_digits", "ece_digits", "recall1_scenes", "recall1_digits", "zero_shot_mean", "params"):
        assert key in row, key
    assert 0 <= row["zero_shot_digits"] <= 1 and "recall@1" in (run_dir / "report.md").read_text()
    assert (run_dir / "reliability.png").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/i2t" in m and 0 < m["logit_scale"] <= 100 for m in metrics)
    VisionTextDualEncoderModel.from_pretrained(str(run_dir / "student"))

