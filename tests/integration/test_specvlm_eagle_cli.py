"""SpecVLM with EAGLE's feature-level head through the real CLI: a tiny LLaVA target trained here, the head
trained on its features for a few steps (the student untouched), the acceptance curve measured with the head
drafting, the head folder written and loadable against the target, and a run resumed after step 2 ending with
the same losses and the same head."""

import json
import shutil

import torch
import pytest
import yaml
from cli_helpers import interrupted_copy, stillroom

TINY = {"patch_size": 8, "vision_hidden": 16, "vision_layers": 1, "vision_heads": 2, "hidden": 32, "layers": 2,
        "heads": 4, "kv_heads": 2, "mlp_ratio": 2, "max_positions": 64, "vocab_size": 300}


def test_specvlm_eagle_head_run(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from safetensors.torch import load_file

    from stillroom.generate.eagle_draft import eagle_draft_from
    from stillroom.generate.eagle_head import build_head
    from stillroom.generate.speculative import autoregressive_generate, speculative_generate

    recipe = {
        "name": "eagle", "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "method": "specvlm",
        "specvlm": {"draft": "eagle_head", "eval_every": 2, "gamma": 2, "prompts": 2, "max_new_tokens": 4},
        "vlm": {"teacher": {"arch": TINY, "steps": 6, "batch_size": 4}, "report_images": 0,
                "data": {"images": 12, "per_image": 2, "scenes": {"image_size": 16}}},
        "teacher": {"dtype": "float32"},
        "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}},
        "data": {"seq_len": 48, "heldout_fraction": 0.25, "heldout_max": 4},
        "loss": {"terms": [{"name": "soft_ce", "weight": 0.1},
                           {"name": "hidden_smooth_l1", "weight": 1.0, "params": {"layers": "last"}}]},
        "train": {"steps": 4, "micro_batch_size": 4, "warmup_steps": 0, "precision": "fp32", "save_every": 2},
        "eval": {"before": False, "heldout_sequences": 4, "batch_size": 4, "max_new_tokens": 3, "speed_tokens": 16},
    }
    path = tmp_path / "eagle.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = stillroom("run", str(path))
    assert "EAGLE head draft, 1 decoder layer(s)" in proc.stdout
    run = tmp_path / "runs" / "eagle"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss/hidden_smooth_l1" in r]
    assert len(losses) == 4 and all(r["loss/soft_ce"] > 0 for r in losses)
    curve = json.loads((run / "specvlm_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    assert all(1.0 <= p["spec_accept_len"] <= 3.0 for p in curve["points"])
    assert "EAGLE feature-level head saved in `eagle_head/`" in (run / "report.md").read_text()

    # the head folder drafts for the cached target, losslessly
    target = LlavaForConditionalGeneration.from_pretrained(next((tmp_path / "cache" / "vlms").iterdir())).eval()
    draft = eagle_draft_from(run / "eagle_head", target)
    ids = [1, 5, 9, 14]
    want = autoregressive_generate(target, ids, max_new_tokens=6).tokens
    assert speculative_generate(target, draft, ids, gamma=2, max_new_tokens=6).tokens == want

    # the saved head is the trained player (its checkpoint), moved away from its seeded initial weights
    saved = load_file(str(run / "eagle_head" / "model.safetensors"))
    checkpoint = load_file(str(run / "checkpoints" / "step_000004" / "eagle_head.safetensors"))
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)
    initial = build_head(target, seed=0).state_dict()
    assert not torch.equal(initial["fc.weight"], saved["fc.weight"])

    # killed after step 2's checkpoint, then --resume: the same losses, the same head
    interrupted_copy(run, tmp_path / "runs" / "resumed", after_step=2, final_step=4)
    shutil.rmtree(tmp_path / "runs" / "resumed" / "eagle_head")  # written at the end, as the student is
    proc = stillroom("run", str(path), "name=resumed", "--resume")
    assert "resumed from" in proc.stdout
    resumed = [json.loads(line) for line in (tmp_path / "runs" / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in losses], abs=1e-6)
    again = load_file(str(tmp_path / "runs" / "resumed" / "eagle_head" / "model.safetensors"))
    assert all(torch.allclose(again[k], saved[k], atol=1e-6) for k in saved)
