"""`stillroom prune` through the real CLI: depth + width into a folder plain transformers loads, a run that
trains the pruned model as its student, and an impossible target refused before any work."""

import json

from cli_helpers import stillroom
from transformers import AutoConfig, AutoModelForCausalLM


def test_prune_depth_then_width_and_train_the_result(recipe_factory, tmp_path):
    out = tmp_path / "pruned"
    recipe = recipe_factory(prune={
        "out": str(out), "calibration": {"seq_len": 16, "batches": 2, "batch_size": 2},
        "depth": {"strategy": "block_influence", "num_layers": 3},
        "width": {"intermediate_size": 32, "hidden_size": 24},
    })
    proc = stillroom("prune", str(recipe))
    assert "parameters" in proc.stdout and str(out) in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size, model.config.hidden_size) == (3, 32, 24)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    assert sum(r["kept_as"] is None for r in report["rows"] if r["module"].startswith("layers.")) == 1
    assert (out / "prune_report.md").is_file() and (out / "tokenizer_config.json").is_file()
    again = stillroom("prune", str(recipe), check=False)
    assert again.returncode != 0 and "prune.overwrite" in again.stdout + again.stderr
    stillroom("run", str(recipe), f"student.model.path={out}", "student.from_teacher=null", "train.steps=2")


def test_impossible_width_is_refused_before_work(recipe_factory, tmp_path):
    out = tmp_path / "never"
    recipe = recipe_factory(prune={"out": str(out), "width": {"num_attention_heads": 64}})
    proc = stillroom("prune", str(recipe), check=False)
    heads = AutoConfig.from_pretrained(_teacher(recipe)).num_attention_heads
    assert proc.returncode != 0
    assert f"prune.width.num_attention_heads=64 but the model has num_attention_heads={heads}" in proc.stdout + proc.stderr
    assert not out.exists() and not out.with_name("never.tmp").exists()


def _teacher(recipe):
    import yaml

    return yaml.safe_load(recipe.read_text())["teacher"]["model"]["path"]
