"""dParallel through the real CLI: the base model trained once and cached, its self-distillation answers cached,
certainty forcing and the CE-only baseline, the decoding report, exact resume, and refused input."""

import json

import pytest
from cli_helpers import assert_same_losses, stillroom

TINY = ["masked_diffusion.task.length=8", "masked_diffusion.task.values=4", "masked_diffusion.task.train_prompts=64",
        "masked_diffusion.task.heldout_prompts=16", "masked_diffusion.model.hidden_size=16",
        "masked_diffusion.model.layers=1", "masked_diffusion.model.heads=2", "masked_diffusion.model.intermediate_size=32",
        "masked_diffusion.base.steps=30", "masked_diffusion.base.batch_size=16", "masked_diffusion.block_size=4",
        "masked_diffusion.eval.tokens_per_step=[1,2,4]", "masked_diffusion.eval.thresholds=[0.1,0.5]",
        "masked_diffusion.eval.threshold=0.5", "train.micro_batch_size=8", "train.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dparallel_cache")


def _args(out, cache, *more):
    return ["dparallel", f"output_dir={out}", f"cache_dir={cache}", *TINY, *more]


def test_dparallel_run_reports_accuracy_against_steps_and_resumes_exactly(tmp_path, cache):
    const = ["train.save_every=2", "train.log_every=1"]
    proc = stillroom("run", *_args(tmp_path, cache, "train.steps=4", "name=full", *const))
    assert "base model: training a BertForMaskedLM" in proc.stdout
    assert "self-distillation data: decoding 64 training prompts" in proc.stdout
    run_dir = tmp_path / "full"
    report = json.loads((run_dir / "report.json").read_text())
    for key in ("teacher", "student_after", "baseline"):
        row = report[key]
        assert {"accuracy", "threshold_accuracy", "tokens_per_step", "decode_steps"} <= set(row)
        decoders = {(r["decoder"], r["setting"]) for r in row["decoding"]}
        assert decoders == {("slow", 1.0), ("slow", 2.0), ("slow", 4.0), ("threshold", 0.1), ("threshold", 0.5)}
        slow4 = next(r for r in row["decoding"] if r["decoder"] == "slow" and r["setting"] == 4.0)
        assert slow4["steps"] == 2.0 and slow4["tokens_per_step"] == 4.0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/cert" in m and "loss/ce" in m for m in metrics if "loss" in m)
    assert "| dParallel student | threshold | entropy < 0.5 |" in (run_dir / "decoding.md").read_text()
    assert "tokens/step (threshold)" in (run_dir / "report.md").read_text()
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(run_dir / "student").config.vocab_size == 6
    stillroom("run", *_args(tmp_path, cache, "train.steps=2", "name=part", *const))
    resumed = stillroom("run", *_args(tmp_path, cache, "train.steps=4", "name=part", *const), "--resume")
    assert "cached BertForMaskedLM" in resumed.stdout and "self-distillation data: cached" in resumed.stdout
    assert_same_losses(tmp_path / "part", run_dir, abs=1e-6, steps=4)
    assert_same_losses(tmp_path / "part" / "baseline", run_dir / "baseline", abs=1e-6, steps=4)


def test_bad_input_is_refused_before_training(tmp_path, cache):
    missing = stillroom("run", *_args(tmp_path, cache, f"masked_diffusion.base.path={tmp_path}"), check=False)
    assert missing.returncode != 0 and "has no config.json" in missing.stderr
    block = stillroom("run", *_args(tmp_path, cache, "masked_diffusion.block_size=16"), check=False)
    assert block.returncode != 0 and "block_size=16 is longer than the answer" in block.stderr
    kd = stillroom("run", *_args(tmp_path, cache, "method=kd", "dparallel=null"), check=False)
    assert kd.returncode != 0 and "domain: masked_diffusion takes method dparallel, sft" in kd.stderr
