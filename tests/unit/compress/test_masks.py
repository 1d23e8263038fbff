"""FixedMasks: taken from a sparse model's zeros and re-applied after optimizer steps (the loop's
``Player.after_update``: tests/integration/test_sparse_cli.py trains, kills and resumes through it)."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from stillroom.compress.masks import FixedMasks
from stillroom.compress.sparsity import sparsify
from stillroom.config.core import StudentConfig
from stillroom.config.sparsity import SparsityPrune


def _sparse_llama(tok, fraction: float = 0.5):
    model = tiny_llama(len(tok), layers=2, seed=0)
    sparsify(model, SparsityPrune(fraction=fraction), None, log=lambda _: None)
    return model


def test_masks_hold_the_zeros_through_adamw_steps(tok):
    model = _sparse_llama(tok).train()
    masks = FixedMasks.from_zeros(model, ["q_proj", "down_proj"])
    zero_before = {n: (w == 0).clone() for n, w in masks.weights.items()}
    assert set(masks.weights) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                  for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(torch.equal(masks.masks[n], ~zero_before[n]) for n in masks.weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    kept_before = {n: w.detach().clone() for n, w in masks.weights.items()}
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    regrown = sum(int((w[zero_before[n]] != 0).sum()) for n, w in masks.weights.items())
    assert regrown > 0  # without the masks, AdamW moves pruned weights away from zero
    masks.apply()
    for n, w in masks.weights.items():
        assert int((w[zero_before[n]] != 0).sum()) == 0
        assert not torch.equal(w, kept_before[n])  # the kept weights trained
    snapshot = {n: w.detach().clone() for n, w in masks.weights.items()}
    masks.apply()  # idempotent
    assert all(torch.equal(w, snapshot[n]) for n, w in masks.weights.items())


def test_summary_counts_the_zeros(tok):
    model = _sparse_llama(tok, fraction=0.7)
    masks = FixedMasks.from_zeros(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"])
    summary = masks.summary()
    assert len(summary["modules"]) == 14
    assert summary["sparsity"] == pytest.approx(0.7, abs=0.005)
    assert summary["zeros"] == sum(int((w == 0).sum()) for w in masks.weights.values())
    assert masks.mask_sparsity() == pytest.approx(summary["sparsity"])
    with pytest.raises(ValueError, match="student.fixed_sparsity.modules"):
        FixedMasks.from_zeros(model, ["c_fc"])


def test_fixed_sparsity_config_refuses_lora():
    with pytest.raises(ValueError, match="trainable=full"):
        StudentConfig(from_config={"num_hidden_layers": 1}, trainable="lora", fixed_sparsity={})
    assert StudentConfig(from_config={"num_hidden_layers": 1}, fixed_sparsity={}).fixed_sparsity.modules[0] == "q_proj"


def test_a_dense_student_is_refused_and_a_sparse_one_gets_the_masks(tok):
    from stillroom.config.schema import RunConfig
    from stillroom.domains.lm.prepare import _fixed_masks

    cfg = RunConfig(student={"model": {"path": "unused"}, "fixed_sparsity": {}})
    with pytest.raises(ValueError, match="no zero weights"):
        _fixed_masks(cfg, tiny_llama(len(tok), layers=2, seed=0), log=lambda _: None)
    lines = []
    assert _fixed_masks(cfg, _sparse_llama(tok), log=lines.append) is not None
    assert lines == ["fixed sparsity: 50.0% of the weights of 14 linear layers stay zero"]
    assert _fixed_masks(RunConfig(), _sparse_llama(tok), log=lines.append) is None


def test_the_gradual_recipe_chains_prune_and_fixed_mask_recovery():
    from pathlib import Path

    from stillroom.config.stages import load_stages

    recipe = Path(__file__).resolve().parents[3] / "stillroom" / "recipes" / "sparse_gradual.yaml"
    plan = load_stages(recipe)
    kinds = [(s.name, s.kind) for s in plan.stages]
    assert kinds == [("prune50", "prune"), ("recover50", "run"), ("prune70", "prune"), ("recover70", "run")]
    prune50, recover50, prune70, recover70 = (s.config for s in plan.stages)
    assert prune50.prune.sparsity.fraction == 0.5 and prune70.prune.sparsity.fraction == 0.7
    assert recover50.student.model.path == str(plan.stages[0].output)
    assert prune70.prune.model.path == str(plan.stages[1].output)
    assert recover70.student.model.path == str(plan.stages[2].output)
    assert recover50.student.fixed_sparsity is not None and recover70.student.fixed_sparsity is not None
    assert [t.name for t in recover70.loss.terms] == ["ce", "forward_kl", "squarehead"]
