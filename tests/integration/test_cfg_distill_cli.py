"""cfg_distill through the real CLI: the conditional Llama teacher on markov_modes trained here once and cached, the
student as its copy, the quality/diversity report with the teacher_cfg and baseline rows, exact resume, and refused
input."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom

TINY = ["autoregressive.train_sequences=256", "autoregressive.markov.length=5", "autoregressive.markov.vocab=6",
        "autoregressive.markov.conditions=2", "autoregressive.teacher.steps=10", "autoregressive.teacher.batch_size=32",
        "autoregressive.teacher.hidden_size=8", "autoregressive.teacher.intermediate_size=16",
        "autoregressive.teacher.layers=1", "autoregressive.eval.samples=100", "autoregressive.eval.speed_batch=16",
        "train.micro_batch_size=8", "train.keep_checkpoints=1", "train.schedule=constant", "train.warmup_steps=0",
        "train.save_every=3", "train.log_every=1", "cfg_distill.beta=1.0"]


def _args(out, cache, *more):
    return ["cfg_distill_markov", f"output_dir={out}", f"cache_dir={cache}", *TINY, *more]


def test_cfg_distill_run_reports_quality_and_diversity_and_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    proc = stillroom("run", *_args(tmp_path, cache, "train.steps=6", "name=full"))
    assert "teacher: training a LlamaForCausalLM" in proc.stdout
    run_dir = tmp_path / "full"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "teacher_cfg", "student_after", "baseline"):
        assert {"quality", "diversity", "modes_hit", "nfe", "samples_per_s"} <= set(report[key]), key
        assert report[key]["quality"] < 0 and 0 <= report[key]["diversity"] <= 1
    assert report["teacher_cfg"]["nfe"] == 2 and report["student_after"]["nfe"] == 1
    md = (run_dir / "report.md").read_text()
    assert "Q (true log-lik/seq)" in md and "| teacher (cfg) |" in md
    assert (run_dir / "student" / "config.json").is_file()
    stillroom("run", *_args(tmp_path, cache, "train.steps=3", "name=part", "baseline=false"))
    resumed = stillroom("run", *_args(tmp_path, cache, "train.steps=6", "name=part", "baseline=false"), "--resume")
    assert "cached LlamaForCausalLM" in resumed.stdout
    assert_same_losses(tmp_path / "part", run_dir, abs=1e-6, steps=6)


def test_bad_input_is_refused_before_training(tmp_path):
    wrong = stillroom("run", *_args(tmp_path, tmp_path, "autoregressive.dataset=codebook"), check=False)
    assert wrong.returncode != 0 and "autoregressive.dataset: markov_modes" in wrong.stderr
    weights = stillroom("run", *_args(tmp_path, tmp_path, "autoregressive.markov.mode_weights=[0.5,0.2]"), check=False)
    assert weights.returncode != 0 and "must be positive and sum to 1" in weights.stderr
