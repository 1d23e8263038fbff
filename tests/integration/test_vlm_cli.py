"""A VLM run through the real CLI: a LLaVA teacher trained here and cached, a smaller LLaVA student distilled on
scene questions with images, answer accuracy per family and the answers beside their images in the report, a
student folder that plain transformers loads, spec-eval of the student as a draft on image prompts; and a record
whose image is missing stops the run before training."""

import json

import yaml
from cli_helpers import stillroom

TINY = {"patch_size": 8, "vision_hidden": 16, "vision_layers": 1, "vision_heads": 2, "hidden": 32, "layers": 2,
        "heads": 4, "kv_heads": 2, "mlp_ratio": 2, "max_positions": 64, "vocab_size": 300}


def _recipe(tmp_path, name, **sections):
    recipe = {
        "name": name, "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "method": "kd",
        "vlm": {"teacher": {"arch": TINY, "steps": 6, "batch_size": 4}, "report_images": 3,
                "data": {"images": 12, "per_image": 2, "scenes": {"image_size": 16}}},
        "teacher": {"dtype": "float32"},
        "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}},
        "data": {"seq_len": 48, "heldout_fraction": 0.25, "heldout_max": 4},
        "loss": {"terms": [{"name": "forward_kl"}]},
        "train": {"steps": 3, "micro_batch_size": 4, "warmup_steps": 0, "precision": "fp32"},
        "eval": {"heldout_sequences": 4, "batch_size": 4, "max_new_tokens": 3, "speed_tokens": 16},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_vlm_teacher_trained_here_and_student_distilled(tmp_path):
    from transformers import LlavaForConditionalGeneration

    stillroom("run", str(_recipe(tmp_path, "vlm")))
    run = tmp_path / "runs" / "vlm"
    report = json.loads((run / "report.json").read_text())
    for key in ("teacher", "student_before", "student_after"):
        accuracy = report["models"][key]["answer_accuracy"]
        assert 0.0 <= accuracy <= 1.0
        assert any(k.startswith("accuracy_") for k in report["models"][key])
    page = (run / "vlm_generations.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "student_after" in page
    cached = list((tmp_path / "cache" / "vlms").iterdir())
    assert len(cached) == 1 and json.loads((cached[0] / "teacher.json").read_text())["seed"] == 0
    student = LlavaForConditionalGeneration.from_pretrained(run / "student")
    assert student.config.text_config.num_hidden_layers == 1

    # spec-eval on image prompts: the distilled student drafts for the cached teacher, losslessly
    vqa = next((tmp_path / "cache" / "vqa").iterdir()) / "records.jsonl"
    stillroom("spec-eval", "--target", str(cached[0]), "--draft", str(run / "student"), "--data", str(vqa),
              "--prompts", "2", "--max-new-tokens", "3", "--gamma", "2", "--modes", "greedy", "--out",
              str(tmp_path / "spec"))
    spec = json.loads((tmp_path / "spec" / "report.json").read_text())
    assert spec["results"][0]["matches_target_greedy"] is True and spec["data"]["prompts"] == 2

    # a record whose image is missing: named before any training step, the teacher (cached) reused
    records = [json.loads(line) for line in (next((tmp_path / "cache" / "vqa").iterdir()) / "records.jsonl")
               .read_text().splitlines()]
    folder = next((tmp_path / "cache" / "vqa").iterdir())
    rows = [{**r, "image": str(folder / r["image"])} for r in records]
    rows[2]["image"] = str(tmp_path / "gone.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vlm = {"teacher": {"path": str(cached[0])}}
    proc = stillroom("run", str(_recipe(tmp_path, "bad", vlm=vlm, data={"sources": [{"path": str(bad)}]})),
                     check=False)
    assert proc.returncode != 0
    assert "bad.jsonl:3" in proc.stderr and "gone.png does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()
