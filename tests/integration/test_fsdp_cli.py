"""FSDP2 (train.parallel=fsdp) through the real CLI under torchrun, two processes on gloo: the same losses,
gradient norms and trained weights as one process, on the fused loss path with a sharded teacher too; a stopped
and resumed sharded run continues exactly; the saved student loads with transformers alone."""

import json

import pytest
import torch
from cli_helpers import assert_same_losses, run_losses, stillroom, stillroom_torchrun
from safetensors.torch import load_file

# grad_accum=2: the first micro-batch's gradients stay local (no_sync); clipping on; a constant schedule so a run
# stopped at step 3 and resumed to 6 follows the same learning rates as one run of 6.
TRAIN = {"steps": 6, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "warmup_steps": 2, "lr": 1e-3,
         "schedule": "constant", "clip_grad_norm": 0.5, "save_every": 0}
NO_EVAL = ["eval.before=false", "eval.generations=0"]
FSDP = ["train.parallel=fsdp", "train.micro_batch_size=1"]  # 2 processes x 1 = the one process's 2 per micro-batch


def _grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _student_weights(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run_dir / "student").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.multiproc
@pytest.mark.parametrize("fused,shard_teacher", [(True, True), (False, False)])
def test_fsdp_two_processes_match_one(recipe_factory, tmp_path, fused, shard_teacher):
    """The fused path reads the output head's weight in the root's forward and applies it after: parity here
    shows it is the gathered weight; the sharded teacher's signal must equal the whole one's for the losses."""
    recipe = recipe_factory(train=TRAIN)
    runs = tmp_path / "runs"
    # periodic evaluation (process 0 alone, every weight gathered) and a generation after training (process 0
    # alone on the model gathered for good) must not stall the other process or change the training
    settings = [f"loss.fused={fused}", "eval.before=false", "train.eval_every=3",
                f"eval.generations={int(shard_teacher)}"]
    stillroom("run", str(recipe), "name=one", *settings)
    out = stillroom_torchrun("run", str(recipe), "name=two", f"train.shard_teacher={shard_teacher}", *FSDP, *settings)
    assert "training: 6 steps" in out.stdout + out.stderr
    assert_same_losses(runs / "two", runs / "one", abs=1e-5, steps=6)
    assert _grad_norms(runs / "two") == pytest.approx(_grad_norms(runs / "one"), abs=1e-5)  # clipped on DTensors
    one, two = _student_weights(runs / "one"), _student_weights(runs / "two")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name

    from transformers import AutoModelForCausalLM  # the saved student is a plain Hugging Face folder

    model = AutoModelForCausalLM.from_pretrained(runs / "two" / "student")
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


@pytest.mark.multiproc
def test_fsdp_stop_and_resume_matches_uninterrupted(recipe_factory, tmp_path):
    recipe = recipe_factory(train={**TRAIN, "save_every": 3})
    runs = tmp_path / "runs"
    stillroom("run", str(recipe), "name=one", *NO_EVAL)
    stillroom_torchrun("run", str(recipe), "name=split", "train.steps=3", *FSDP, *NO_EVAL)
    assert (runs / "split" / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    out = stillroom_torchrun("run", str(recipe), "name=split", "--resume", "train.steps=6", *FSDP, *NO_EVAL)
    assert "resumed from" in out.stdout + out.stderr
    assert_same_losses(runs / "split", runs / "one", abs=1e-5, steps=6)
    # the checkpoint a sharded run writes is the one-process format: one process resumes it too
    stillroom("run", str(recipe), "name=split", "--resume", "train.steps=7", *FSDP, *NO_EVAL)
    assert len(run_losses(runs / "split")) == 7
