"""CoMD through the real CLI on tiny models: `stillroom vqa-data` and `stillroom vqa-lm` make the text scene
questions and a (random) scene-QA model, the shipped comd_scenes recipe runs 2 rounds, and comd.json records the
rounds, the pool growing by the augmentation, the teacher answers used and the held-out exact-match table."""

import json

from cli_helpers import stillroom

from stillroom.cli.main import main

TINY_LM = ["--hidden", "16", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--mlp-ratio", "2"]


def test_comd_recipe_runs_rounds_that_grow_the_pool(tmp_path):
    data, lm = tmp_path / "qa.jsonl", tmp_path / "qa_lm"
    assert main(["vqa-data", str(data), "--format", "text", "--images", "12", "--per-image", "2"]) == 0
    assert main(["vqa-lm", str(lm), *TINY_LM]) == 0
    out = tmp_path / "runs"
    stillroom("run", "comd_scenes", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
              f"teacher.model.path={lm}", "student.from_config={hidden_size: 16, intermediate_size: 32}",
              f"data.sources=[{{path: {data}, format: prompt_completion}}]", "data.heldout_max=4",
              "comd.rounds=2", "comd.initial_per_family=2", "comd.augment_per_round=4", "comd.probe_per_family=2",
              "comd.eval_per_level=1", "comd.max_answer_tokens=2", "train.steps=4", "train.micro_batch_size=4",
              "train.warmup_steps=1", "eval.heldout_sequences=4", "eval.generations=1", "eval.max_new_tokens=2",
              "eval.speed_tokens=16")
    run_dir = out / "comd_scenes"
    result = json.loads((run_dir / "comd.json").read_text())
    assert result["arm"] == "rounds" and result["budget"] == 2 * 5 + 4 == result["teacher_answers"]
    assert [r["pool"] for r in result["rounds"]] == [10, 14] and [r["step"] for r in result["rounds"]] == [0, 2]
    assert result["rounds"][0]["failure_rate"] is None and len(result["rounds"][1]["failure_rate"]) == 5
    assert result["judge_answers"] == 2 * 5
    for who in ("student", "teacher", "agreement"):
        table = result["heldout"][who]
        assert set(table["families"]) == {"colour_of", "shape_at", "count", "exists", "unanswerable"}
        assert 0.0 <= table["hard"] <= 1.0 and 0.0 <= table["overall"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["comd/pool"] for r in rows] == [10, 10, 14, 14] and rows[-1]["comd/teacher_answers"] == 14
    assert (run_dir / "student" / "config.json").is_file()


def test_comd_vlm_recipe_asks_rendered_scenes_with_their_images(tmp_path):
    """The shipped comd_vlm recipe on a tiny scratch VLM: every instruction's scene is a PNG in the run folder."""
    arch = ("{patch_size: 8, vision_hidden: 16, vision_layers: 1, vision_heads: 2, hidden: 32, layers: 2, heads: 4, "
            "kv_heads: 2, mlp_ratio: 2, max_positions: 64, vocab_size: 300}")
    out = tmp_path / "runs"
    stillroom("run", "comd_vlm", f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
              f"vlm={{teacher: {{arch: {arch}, steps: 6, batch_size: 4, vision: scratch}}, report_images: 0, "
              "data: {images: 12, per_image: 2, scenes: {image_size: 16}}}", "comd.scenes={image_size: 16}",
              "comd.rounds=2", "comd.initial_per_family=2", "comd.augment_per_round=4", "comd.probe_per_family=2",
              "comd.eval_per_level=1", "comd.max_answer_tokens=2", "train.steps=4", "train.micro_batch_size=4",
              "train.warmup_steps=1", "data.heldout_max=4", "eval.heldout_sequences=4", "eval.max_new_tokens=2",
              "eval.speed_tokens=16", "eval.before=false")
    run_dir = out / "comd_vlm"
    result = json.loads((run_dir / "comd.json").read_text())
    assert [r["pool"] for r in result["rounds"]] == [10, 14] and result["judge_answers"] == 10
    assert 0.0 <= result["heldout"]["student"]["overall"] <= 1.0
    scenes = sorted(p.name for p in (run_dir / "comd_images").iterdir())
    assert len(scenes) == 15 + 10 + 10 + 4  # held-out, round-1 pool, round-2 probes, round-2 pool; no temp file
    assert scenes[0] == "heldout-00000.png" and "r2-pool-00003.png" in scenes
