"""End to end through the real CLI with a tiny random teacher: run, report, validate, errors."""

import json

import pytest
from cli_helpers import stillroom

REQUIRED = ["heldout_ce", "perplexity", "bits_per_byte", "kl_teacher_student", "top1_agreement", "params", "tokens_per_s"]


def test_run_writes_report_for_every_model(recipe_factory, tmp_path):
    recipe = recipe_factory(baseline=True)
    stillroom("run", str(recipe))
    run_dir = tmp_path / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ["teacher", "student_before", "student_after", "baseline"]:
        assert key in report, f"report.json lacks {key}"
        for metric in REQUIRED:
            assert report[key][metric] is not None, f"{key}.{metric} is missing"
    assert report["teacher"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert report["teacher"]["top1_agreement"] == pytest.approx(1.0)
    # Training against the teacher moves the student towards it.
    assert report["student_after"]["kl_teacher_student"] < report["student_before"]["kl_teacher_student"]
    assert report["student_after"]["params"] < report["teacher"]["params"]
    for name in ["config.resolved.yaml", "metrics.jsonl", "report.md", "loss_curves.png", "metrics_bars.png"]:
        assert (run_dir / name).is_file(), name
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert (run_dir / "student" / "config.json").is_file()
    assert (run_dir / "baseline" / "metrics.jsonl").is_file()


def test_unknown_key_names_the_nearest(recipe_factory):
    recipe = recipe_factory()
    proc = stillroom("validate", str(recipe), "train.setps=3", check=False)
    assert proc.returncode == 2
    assert "train.setps" in proc.stderr and "train.steps" in proc.stderr


def test_validate_accepts_a_good_recipe(recipe_factory):
    proc = stillroom("validate", str(recipe_factory()))
    assert "OK" in proc.stdout


def test_unknown_loss_term_fails_before_loading(recipe_factory):
    proc = stillroom("validate", str(recipe_factory()), "loss.terms=[{name: forward_kll}]", check=False)
    assert proc.returncode != 0
    assert "forward_kll" in proc.stderr and "forward_kl" in proc.stderr


def test_non_finite_loss_stops_with_step_and_checkpoint(recipe_factory):
    recipe = recipe_factory(train={"steps": 8, "save_every": 2, "lr": 1e30, "clip_grad_norm": None,
                                   "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 0, "schedule": "constant"})
    proc = stillroom("run", str(recipe), "eval.before=false", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NonFiniteLoss" in proc.stderr and "step" in proc.stderr
    assert "checkpoint" in proc.stderr


def test_lora_student_trains_adapters_only(recipe_factory, tmp_path):
    recipe = recipe_factory(student={"from_teacher": {"strategy": "explicit", "layers": [0, 3]}, "trainable": "lora",
                                     "lora": {"r": 4, "alpha": 8}})
    stillroom("run", str(recipe), "eval.generations=0")
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    after = report["student_after"]
    assert 0 < after["trainable_params"] < after["params"] / 4
    assert after["kl_teacher_student"] < report["student_before"]["kl_teacher_student"]
    # The saved student is a plain HF model with the adapters merged.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "tiny" / "student")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_different_tokenizer_is_refused_before_step_0(recipe_factory, tmp_path):
    from helpers import save_tiny_teacher

    other = save_tiny_teacher(tmp_path / "other", layers=2, vocab_size=300, seed_text="a different corpus entirely",
                              pretrain_steps=1)
    recipe = recipe_factory(student={"model": {"path": str(other)}})
    proc = stillroom("run", str(recipe), check=False)
    assert proc.returncode == 1
    assert "VocabularyMismatch" in proc.stderr
    assert "step-by-step" in proc.stderr and "sequence-level KD" in proc.stderr
    assert not (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()


def test_periodic_evaluation_is_logged(recipe_factory, tmp_path):
    recipe = recipe_factory(train={"steps": 4, "eval_every": 2, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1})
    stillroom("run", str(recipe), "eval.before=false", "eval.generations=0")
    rows = [json.loads(l) for l in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/heldout_ce" in rows[1] and "eval/kl_teacher_student" in rows[1]
    assert "eval/heldout_ce" not in rows[0]


def test_student_from_config_trains_through_the_cli(recipe_factory, tmp_path):
    recipe = recipe_factory()
    proc = stillroom("run", str(recipe), "student.from_config={num_hidden_layers: 1, intermediate_size: 16}",
                     "eval.before=false")
    assert "new 1-layer model from the teacher's config" in proc.stdout
    saved = json.loads((tmp_path / "runs" / "tiny" / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved["intermediate_size"] == 16
