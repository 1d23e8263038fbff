"""OGEN through the real CLI on a tiny transformers CLIPModel folder (the standard CLIP class layout): the
shipped recipe with both regularisers, a few epochs, ogen.json with base / new accuracy and the head's weights."""

import json

from clip_helpers import tiny_clip_model_folder
from cli_helpers import stillroom


def test_ogen_recipe_on_a_clip_model_folder(tmp_path):
    folder = tiny_clip_model_folder(tmp_path / "clip")
    proc = stillroom("run", "ogen_digits", f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}",
                     f"ogen.clip={{path: {folder}}}", "clip.image_size=16", "clip.images_per_class=6",
                     "clip.heldout_per_class=3", "ogen.shots=4", "ogen.generator_steps=20", "ogen.eval_every_epochs=2",
                     "train.steps=4", "train.micro_batch_size=10", "train.log_every=1", "train.warmup_steps=1")
    assert "ogen: generator trained leave-one-class-out for 20 steps" in proc.stdout
    assert "2 step(s) per epoch" in proc.stdout
    record = json.loads((tmp_path / "ogen_digits" / "ogen.json").read_text())
    assert record["base_classes"] == [0, 1, 2, 3, 4] and record["new_classes"] == [5, 6, 7, 8, 9]
    assert {"base", "new", "hm"} <= set(record["final"]) and [c["epoch"] for c in record["curve"]] == [2]
    metrics = [json.loads(line) for line in (tmp_path / "ogen_digits" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/sd" in m and "loss/ce" in m for m in metrics) and metrics[-1]["window"] == 1
    assert (tmp_path / "ogen_digits" / "ogen_head.safetensors").is_file()
    models = json.loads((tmp_path / "ogen_digits" / "report.json").read_text())["models"]
    assert models["student_after"]["ogen_hm"] == record["final"]["hm"]  # the trained head, in the report
    assert models["student_before"]["ogen_new"] == record["zero_shot"]["new"]
    assert "ogen_hm" in (tmp_path / "ogen_digits" / "report.md").read_text()
