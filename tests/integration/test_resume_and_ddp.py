"""Exact resume after SIGKILL, and two processes (gloo) matching one, through the real CLI."""

import pytest
from cli_helpers import (assert_same_losses, completed_checkpoints, run_losses, stillroom, stillroom_sigkilled,
                         stillroom_torchrun)

FAST_TRAIN = {"micro_batch_size": 4, "precision": "fp32", "warmup_steps": 2, "lr": 1e-3, "save_every": 5, "keep_checkpoints": 2}
NO_EVAL = ["eval.before=false", "eval.generations=0"]


def test_sigkill_then_resume_matches_uninterrupted(recipe_factory, tmp_path):
    steps = 120
    recipe = recipe_factory(train={**FAST_TRAIN, "steps": steps})
    stillroom("run", str(recipe), "name=full", *NO_EVAL)
    full = run_losses(tmp_path / "runs" / "full")

    run_dir = tmp_path / "runs" / "killed"
    stillroom_sigkilled("run", str(recipe), "name=killed", *NO_EVAL, when=lambda: completed_checkpoints(run_dir))
    done = completed_checkpoints(run_dir)
    assert done and f"step_{steps:06d}" not in str(done[-1])

    out = stillroom("run", str(recipe), "name=killed", "--resume", *NO_EVAL)
    assert "resumed from" in out.stdout
    resumed = run_losses(run_dir)
    assert len(resumed) == steps
    assert resumed[-1] == pytest.approx(full[-1], abs=1e-6)
    assert resumed == pytest.approx(full, abs=1e-6)


@pytest.mark.multiproc
def test_two_processes_match_one(recipe_factory, tmp_path):
    recipe = recipe_factory(train={**FAST_TRAIN, "steps": 6, "save_every": 0, "micro_batch_size": 4})
    stillroom("run", str(recipe), "name=one", *NO_EVAL)
    stillroom_torchrun("run", str(recipe), "name=two", "train.micro_batch_size=2", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "two", tmp_path / "runs" / "one", abs=1e-5, steps=6)


@pytest.mark.multiproc
def test_two_processes_match_one_with_a_learned_loss_projection(recipe_factory, tmp_path):
    """hidden_mse between a narrower student and the teacher learns a projection that lives in the loss, outside
    the DDP-wrapped forward module: its gradients must be averaged over the processes too, or each process trains
    its own copy and the two-process run leaves the one-process one after the first step."""
    recipe = recipe_factory(
        train={**FAST_TRAIN, "steps": 4, "save_every": 0, "micro_batch_size": 4},
        student={"from_config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}},
        loss={"terms": [{"name": "forward_kl"}, {"name": "hidden_mse", "weight": 1.0}],
              "chunk_tokens": 64})
    stillroom("run", str(recipe), "name=one", *NO_EVAL)
    stillroom_torchrun("run", str(recipe), "name=two", "train.micro_batch_size=2", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "two", tmp_path / "runs" / "one", abs=1e-5, steps=4)
