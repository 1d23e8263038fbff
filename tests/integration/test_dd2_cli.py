"""DD2 through the real CLI: the Llama teacher trained here once and cached, the GTS stage, the generator and
guidance players, the exact-TV report with the independent-marginals row, exact resume, and refused input."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom

TINY = ["autoregressive.train_sequences=512", "autoregressive.teacher.steps=15", "autoregressive.teacher.batch_size=64",
        "autoregressive.teacher.hidden_size=8", "autoregressive.teacher.intermediate_size=16",
        "autoregressive.teacher.layers=1", "autoregressive.generator.hidden=8", "autoregressive.generator.head_width=16",
        "autoregressive.eval.samples=500", "autoregressive.eval.speed_batch=64", "dd2.gts_steps=8",
        "dd2.gts_batch_size=32", "train.micro_batch_size=32", "train.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dd2_cache")


def _args(out, cache, *more):
    return ["dd2_codebook", f"output_dir={out}", f"cache_dir={cache}", *TINY, *more]


def test_dd2_run_writes_the_exact_tv_report_and_resumes_exactly(tmp_path, cache):
    const = ["train.schedule=constant", "train.warmup_steps=0", "train.save_every=3", "train.log_every=1"]
    proc = stillroom("run", *_args(tmp_path, cache, "train.steps=6", "name=full", *const))
    assert "teacher: training a LlamaForCausalLM" in proc.stdout and "dd2: GTS stage" in proc.stdout
    run_dir = tmp_path / "full"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "teacher_independent", "student_before", "student_after"):
        assert {"joint_tv", "pair_tv_12", "pair_tv_14", "tv_true"} <= set(report[key])
    assert report["teacher"]["nfe"] == 4 and report["student_after"]["nfe"] == 1
    assert 0 <= report["teacher"]["teacher_tv_true"] <= 1
    md = (run_dir / "report.md").read_text()
    assert "joint TV to teacher" in md and "| teacher (independent) |" in md
    assert (run_dir / "student" / "ar_net.json").is_file()
    from transformers import AutoModelForCausalLM

    teacher_dirs = list((cache / "autoregressive_teachers").iterdir())
    assert AutoModelForCausalLM.from_pretrained(teacher_dirs[0]).config.vocab_size == 9
    stillroom("run", *_args(tmp_path, cache, "train.steps=3", "name=part", *const))
    resumed = stillroom("run", *_args(tmp_path, cache, "train.steps=6", "name=part", *const), "--resume")
    assert "cached LlamaForCausalLM" in resumed.stdout and "GTS initialisation from the cache" in resumed.stdout
    assert_same_losses(tmp_path / "part", run_dir, abs=1e-6, steps=6)


def test_bad_input_is_refused_before_training(tmp_path, cache):
    missing = stillroom("run", *_args(tmp_path, cache, f"autoregressive.teacher.path={tmp_path}"), check=False)
    assert missing.returncode != 0 and "has no config.json" in missing.stderr
    base = stillroom("run", *_args(tmp_path, cache, "baseline=true"), check=False)
    assert base.returncode != 0 and "set baseline: false" in base.stderr
    time = stillroom("run", *_args(tmp_path, cache, "dd2.t_min=0.9", "dd2.t_max=0.5"), check=False)
    assert time.returncode != 0 and "dd2.t_min=0.9 must be below dd2.t_max=0.5" in time.stderr
