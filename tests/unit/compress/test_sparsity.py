"""The sparsity pruners (stillroom.compress.sparsity / sparsegpt): which weights each one zeroes, N:M patterns
element by element, per-layer fractions, and the errors raised before any weight changes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from helpers import tiny_llama
from stillroom.compress.sparsegpt import sparsegpt_prune
from stillroom.compress.sparsity import Target, prune_mask, sparsify
from stillroom.config.sparsity import SparsityPrune


class EmbedLinear(nn.Module):
    """input ids -> embedding (columns scaled very differently) -> one linear layer ``proj``."""

    def __init__(self, vocab: int = 50, width: int = 16, out: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        with torch.no_grad():
            self.emb.weight.mul_(torch.logspace(-2, 1, width))  # input feature j has norm ~ 10^(-2 + 3j/width)
        self.proj = nn.Linear(width, out, bias=False)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def _calibration(vocab: int, batches: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(batches)]


def test_magnitude_keeps_the_largest_weights_per_layer_and_per_row():
    model = EmbedLinear()
    before = model.proj.weight.detach().clone()
    rows = sparsify(model, SparsityPrune(fraction=0.5, modules=["proj"]), None, log=lambda _: None)
    after = model.proj.weight.detach()
    zero = after == 0
    assert rows == [{"module": "proj", "numel": 128, "zeros": 64, "sparsity": 0.5}]
    assert before.abs()[zero].max() <= before.abs()[~zero].min()
    assert torch.equal(after[~zero], before[~zero])  # kept weights are untouched

    model = EmbedLinear()
    sparsify(model, SparsityPrune(fraction=0.25, modules=["proj"], magnitude_scope="row"), None, log=lambda _: None)
    for row_before, row_after in zip(before, model.proj.weight.detach()):
        zero = row_after == 0
        assert int(zero.sum()) == 4
        assert row_before.abs()[zero].max() <= row_before.abs()[~zero].min()


def test_wanda_ranks_by_weight_times_input_norm_within_each_row():
    model = EmbedLinear()
    calibration = _calibration(50)
    before = model.proj.weight.detach().clone()
    x_ti = torch.cat([model.emb(ids).reshape(-1, 16) for ids in calibration]).detach()
    score = before.abs() * x_ti.norm(dim=0).reshape(1, -1)
    sparsify(model, SparsityPrune(method="wanda", fraction=0.5, modules=["proj"]), calibration, log=lambda _: None)
    after = model.proj.weight.detach()
    for r in range(before.shape[0]):
        zero = after[r] == 0
        assert int(zero.sum()) == 8
        assert score[r][zero].max() <= score[r][~zero].min()
    magnitude = prune_mask(before.abs(), Target("proj", model.proj, 0.5, None), per_row=True)
    assert not torch.equal(magnitude, after == 0)  # the input norms changed the choice


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_element_by_element(tok, method):
    model = tiny_llama(len(tok), layers=2, seed=0)
    cfg = SparsityPrune(method=method, n_m=(2, 4), block_size=16)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    sparsify(model, cfg, _calibration(len(tok)), log=lambda _: None)
    checked = 0
    for name, module in model.named_modules():
        if not name.endswith(tuple(cfg.modules)):
            continue
        weight = module.weight.detach()
        for row in weight:
            for start in range(0, weight.shape[1], 4):
                assert sum(1 for v in row[start:start + 4].tolist() if v != 0) <= 2, (name, start)
        checked += 1
    assert checked == 14
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # the embeddings (and the tied head) stay


def test_sparsegpt_at_zero_changes_nothing():
    torch.manual_seed(0)
    weight = torch.randn(12, 32)
    x_ti = torch.randn(200, 32)
    new = sparsegpt_prune(weight, x_ti.T @ x_ti / 200, fraction=0.0, block_size=8)
    assert torch.allclose(new, weight, atol=1e-6)


def test_sparsegpt_keeps_the_layer_output_better_than_magnitude():
    """Correlated inputs: SparseGPT's compensation lowers ||W X - W' X|| well below magnitude pruning's."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 64, generator=g)
    x_ti = torch.randn(512, 8, generator=g) @ mixing + 0.1 * torch.randn(512, 64, generator=g)
    weight = torch.randn(32, 64, generator=g)
    hessian = x_ti.T @ x_ti / x_ti.shape[0]
    solved = sparsegpt_prune(weight, hessian, fraction=0.5, block_size=16)
    mask = prune_mask(weight.abs(), Target("w", nn.Linear(64, 32), 0.5, None), per_row=True)
    magnitude = weight.masked_fill(mask, 0.0)
    assert (solved == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    err_solved = (x_ti @ (weight - solved).T).norm()
    err_magnitude = (x_ti @ (weight - magnitude).T).norm()
    assert err_solved < 0.5 * err_magnitude


def test_sparsegpt_lazy_block_updates_match_column_by_column():
    """Parity of the fast path: the error of a block is pushed to later columns in one product per block; with
    2:4 (masks chosen every 4 columns either way) blocks of 32 columns give the weights of blocks of 4."""
    g = torch.Generator().manual_seed(1)
    x_ti = torch.randn(256, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.1 * torch.randn(256, 64, generator=g)
    weight = torch.randn(16, 64, generator=g)
    hessian = x_ti.T @ x_ti / x_ti.shape[0]
    fine = sparsegpt_prune(weight, hessian, n_m=(2, 4), block_size=4)
    lazy = sparsegpt_prune(weight, hessian, n_m=(2, 4), block_size=32)
    assert torch.equal(fine == 0, lazy == 0)
    assert torch.allclose(fine, lazy, atol=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_per_layer_fractions_are_achieved(tok, method):
    model = tiny_llama(len(tok), layers=2, seed=0)
    cfg = SparsityPrune(method=method, fraction=0.6, per_layer={r"layers\.0\.": 0.3}, block_size=16)
    rows = sparsify(model, cfg, _calibration(len(tok)), log=lambda _: None)
    assert len(rows) == 14
    for row in rows:
        goal = 0.3 if ".layers.0." in row["module"] else 0.6
        assert row["sparsity"] == pytest.approx(goal, abs=0.02), row
        module = model.get_submodule(row["module"])
        assert row["zeros"] == int((module.weight == 0).sum())


def test_sparsegpt_pass_is_sequential_and_uses_the_calibration(tok):
    """Layer 1's statistics come from inputs through the pruned layer 0: pruning layer 0 harder changes the
    weights SparseGPT leaves in layer 1."""
    results = []
    for first in (0.2, 0.8):
        model = tiny_llama(len(tok), layers=2, seed=0)
        cfg = SparsityPrune(method="sparsegpt", fraction=0.5, per_layer={r"layers\.0\.": first}, block_size=16)
        sparsify(model, cfg, _calibration(len(tok)), log=lambda _: None)
        results.append(model.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_impossible_settings_are_refused_before_any_weight_changes(tok):
    model = tiny_llama(len(tok), layers=2, seed=0)
    model.model.layers[1].mlp.down_proj = nn.Linear(66, 32, bias=False)  # 66 inputs: not divisible by 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj has weight shape \[32, 66\]"):
        sparsify(model, SparsityPrune(n_m=(2, 4)), None, log=lambda _: None)
    with pytest.raises(ValueError, match="matches no linear layer"):
        sparsify(model, SparsityPrune(fraction=0.5, modules=["c_attn"]), None, log=lambda _: None)
    with pytest.raises(ValueError, match="needs calibration batches"):
        sparsify(model, SparsityPrune(method="wanda", fraction=0.5), None, log=lambda _: None)
    with pytest.raises(ValueError, match="matches none of the chosen layers"):
        sparsify(model, SparsityPrune(fraction=0.5, per_layer={"layers\\.7\\.": 0.2}), None, log=lambda _: None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [{"fraction": 1.0}, {"fraction": 0.0}, {"n_m": (4, 4)}, {},
                                 {"fraction": 0.5, "n_m": (2, 4)}, {"n_m": (2, 4), "per_layer": {"q": 0.5}},
                                 {"fraction": 0.5, "per_layer": {"q": 1.5}},
                                 {"method": "sparsegpt", "n_m": (2, 4), "block_size": 6}])
def test_config_refuses_impossible_targets(bad):
    with pytest.raises(ValidationError):
        SparsityPrune(**bad)
