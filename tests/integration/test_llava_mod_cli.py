"""method=llava_mod through the real CLI: an upcycled MoE student's mimic stage, then DPO against the teacher."""

import json

from cli_helpers import stillroom

NO_EVAL = ["eval.before=false", "eval.generations=0", "eval.speed_tokens=16", "eval.heldout_sequences=4"]
COLOURS = ["red", "blue", "green"]
TRAIN = {"steps": 3, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1, "lr": 1e-3}


def _qa_files(tmp_path):
    """Tiny text QA: prompt/completion records and {prompt, chosen, rejected} pairs over the same prompts."""
    qa, pairs = tmp_path / "qa.jsonl", tmp_path / "pairs.jsonl"
    with qa.open("w") as f_qa, pairs.open("w") as f_pairs:
        for i in range(24):
            colour = COLOURS[i % 3]
            prompt = f"Scene: a {colour} box. Question {i}: its colour? Answer:"
            f_qa.write(json.dumps({"prompt": prompt, "completion": f" {colour}"}) + "\n")
            wrong = COLOURS[(i + 1) % 3]
            f_pairs.write(json.dumps({"prompt": prompt, "chosen": f" {colour}", "rejected": f" {wrong}"}) + "\n")
    return qa, pairs


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_llava_mod_mimic_then_preference(recipe_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    qa, pairs = _qa_files(tmp_path)
    data = {"seq_len": 64, "heldout_fraction": 0.2, "heldout_max": 4}
    mimic = recipe_factory(
        method="llava_mod", train=TRAIN, data={**data, "sources": [{"path": str(qa), "format": "prompt_completion"}]},
        loss={"terms": [{"name": "forward_kl"}, {"name": "ce"}], "chunk_tokens": 64},
        llava_mod={"stage": "mimic", "moe": {"upcycle": True, "experts": 4, "top_k": 2}},
    )
    out = stillroom("run", str(mimic), "name=mimic", *NO_EVAL)
    assert "upcycled to MixtralForCausalLM (4 experts, top-2)" in out.stdout
    rows = _metrics(tmp_path / "runs" / "mimic")
    assert len(rows) == 3 and all(0.5 < r["loss/moe_aux"] < 4.0 for r in rows)  # 1 = balanced routing
    student = tmp_path / "runs" / "mimic" / "student"
    moe = AutoModelForCausalLM.from_pretrained(student)  # a plain transformers folder, no stillroom needed
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4

    pref = recipe_factory(
        method="llava_mod", train=TRAIN, student={"model": {"path": str(student)}},
        data={**data, "sources": [{"path": str(pairs), "format": "prompt_completion", "completion_field": "chosen"}]},
        loss={"terms": [{"name": "ce"}]},
        llava_mod={"stage": "preference", "reference": "teacher", "loss_type": "sigmoid", "beta": 0.1},
    )
    out = stillroom("run", str(pref), "name=pref", *NO_EVAL)
    assert "sigmoid pair loss, beta=0.1, reference=teacher" in out.stdout
    rows = _metrics(tmp_path / "runs" / "pref")
    assert len(rows) == 3
    assert all(r["llava_mod/pairs"] == 2 and "loss/moe_aux" in r for r in rows)
    # the logged loss is the mean pair loss (+ the small router term): DPO is -log sigma(.) > 0
    assert all(0 < r["loss/preference"] < 5 for r in rows)


def _vlm_recipe(tmp_path, name, **sections):
    """A tiny VLM run (a scratch LLaVA teacher trained here and cached, scene questions with images)."""
    import yaml

    arch = {"patch_size": 8, "vision_hidden": 16, "vision_layers": 1, "vision_heads": 2, "hidden": 32, "layers": 2,
            "heads": 4, "kv_heads": 2, "mlp_ratio": 2, "max_positions": 64, "vocab_size": 300}
    recipe = {
        "name": name, "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "method": "llava_mod", "teacher": {"dtype": "float32"},
        "vlm": {"teacher": {"arch": arch, "steps": 6, "batch_size": 4, "vision": "scratch"}, "report_images": 0,
                "data": {"images": 12, "per_image": 2, "scenes": {"image_size": 16}}},
        "data": {"seq_len": 48, "heldout_fraction": 0.25, "heldout_max": 4},
        "train": {**TRAIN, "warmup_steps": 0},
        "eval": {"before": False, "heldout_sequences": 4, "batch_size": 4, "max_new_tokens": 3,
                 "speed_tokens": 16, "generations": 0},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_llava_mod_preference_on_image_pairs_sampled_from_the_upcycled_vlm_student(tmp_path):
    mimic = _vlm_recipe(tmp_path, "vlm_mimic", student={"from_config": {"text_config": {"num_hidden_layers": 1}}},
                        loss={"terms": [{"name": "forward_kl"}, {"name": "ce"}]},
                        llava_mod={"stage": "mimic", "moe": {"upcycle": True, "experts": 2, "top_k": 1}})
    stillroom("run", str(mimic))
    student = tmp_path / "runs" / "vlm_mimic" / "student"
    pref = _vlm_recipe(tmp_path, "vlm_pref", student={"model": {"path": str(student)}},
                       loss={"terms": [{"name": "ce"}]},
                       llava_mod={"stage": "preference", "reference": "teacher", "rejected": "sampled",
                                  "chosen": "teacher", "tries": 2, "max_new_tokens": 3})
    out = stillroom("run", str(pref))
    assert "rejected answers sampled from the student" in out.stdout
    rows = _metrics(tmp_path / "runs" / "vlm_pref")
    assert len(rows) == 3 and all(r["llava_mod/pairs"] == 4 and "loss/moe_aux" in r for r in rows)
    assert all(0 < r["loss/preference"] < 5 and 0 <= r["llava_mod/wrong_share"] <= 1 for r in rows)
