"""Sparsity through the real CLI: `stillroom prune` with SparseGPT 2:4 writes a plain Hugging Face folder, and a
sparse recovery run (CE + KL + SquareHead from the dense teacher, fixed masks) killed with SIGKILL and resumed
keeps exactly the pruned zeros."""

from __future__ import annotations

import torch
from cli_helpers import completed_checkpoints, stillroom, stillroom_sigkilled
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NO_EVAL = ["eval.before=false", "eval.generations=0"]


def _zeros(state: dict) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state.items() if k.endswith(tuple(f"{m}.weight" for m in LINEARS))}


def test_prune_two_four_then_sparse_recovery_survives_sigkill(recipe_factory, tmp_path):
    recipe = recipe_factory(
        prune={"sparsity": {"method": "sparsegpt", "n_m": [2, 4], "block_size": 8},
               "calibration": {"seq_len": 32, "batches": 2, "batch_size": 2}},
        student={"model": {"path": str(tmp_path / "runs" / "tiny" / "pruned")}, "fixed_sparsity": {}},
        loss={"terms": [{"name": "ce"}, {"name": "forward_kl"}, {"name": "squarehead"}], "chunk_tokens": 64},
        train={"steps": 30, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 2, "lr": 1e-2,
               "save_every": 3, "keep_checkpoints": 2},
        baseline=False,
    )
    out = stillroom("prune", str(recipe))
    assert "sparsity: sparsegpt 2:4" in out.stdout
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "tiny" / "pruned")  # plain transformers
    zeros = _zeros(pruned.state_dict())
    assert len(zeros) == 4 * len(LINEARS)
    for name, zero in zeros.items():
        groups = (~zero).reshape(zero.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name

    run_dir = tmp_path / "runs" / "tiny"
    stillroom_sigkilled("run", str(recipe), *NO_EVAL, when=lambda: completed_checkpoints(run_dir))
    assert not (run_dir / "student").exists()
    ckpt = completed_checkpoints(run_dir)[-1].parent
    at_kill = _zeros(load_file(str(ckpt / "student.safetensors")))
    assert set(at_kill) == set(zeros) and all(torch.equal(at_kill[k], zeros[k]) for k in zeros)

    out = stillroom("run", str(recipe), "--resume", *NO_EVAL)
    assert "resumed from" in out.stdout
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()
    for name, zero in _zeros(trained).items():
        assert torch.equal(zero, zeros[name]), name  # exactly the pruned zeros, no more, no fewer
    assert not torch.equal(trained["model.layers.0.mlp.down_proj.weight"],
                           pruned.state_dict()["model.layers.0.mlp.down_proj.weight"])  # it trained
    report = (run_dir / "report.md").read_text()
    assert "fixed-sparsity linear layers" in report and "(50.0%)" in report
