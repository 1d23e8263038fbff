"""The masked-diffusion LM: bidirectional attention, LLaDA's objective by hand, the forward process, the folder."""

import math

import pytest
import torch

from stillroom.models.masked_diffusion import (
    build_mdlm, forward_mask, load_mdlm, masked_diffusion_loss, special_ids, token_logits,
)


def _tiny(values=4, positions=9, seed=0):
    return build_mdlm(values, positions, hidden_size=16, layers=1, heads=2, intermediate_size=32, seed=seed).eval()


def test_attention_is_bidirectional_and_the_vocabulary_has_sep_and_mask():
    model = _tiny()
    assert special_ids(4) == (4, 5) and model.config.vocab_size == 6
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 5, 5]])
    changed = tokens.clone()
    changed[0, -1] = 0  # a later position changes ...
    with torch.no_grad():
        first, second = token_logits(model, tokens), token_logits(model, changed)
    assert not torch.allclose(first[0, 0], second[0, 0])  # ... and the first position sees it: no causal mask


def test_masked_diffusion_loss_matches_a_hand_computation():
    # one row, three positions, vocabulary of 2; positions 1 and 2 are answer positions, position 2 masked, t = 0.5
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[0, 0, 1]])
    masked = torch.tensor([[False, False, True]])
    answer = torch.tensor([[False, True, True]])
    total, count = masked_diffusion_loss(logits, tokens, masked, torch.tensor([0.5]), answer)
    # CE at position 2: -log(3/4); weighted 1/t = 2; counted per answer position (2)
    assert total.item() == pytest.approx(-math.log(0.75) / 0.5) and count == 2


def test_unmasked_positions_carry_no_gradient():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    total, _ = masked_diffusion_loss(logits, torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, False]]),
                                     torch.tensor([0.3]), torch.ones(1, 3, dtype=torch.bool))
    total.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    assert logits.grad[0, 1].abs().sum() > 0


def test_forward_mask_limits_and_prompt_positions():
    answer = torch.zeros(2, 6, dtype=torch.bool)
    answer[:, 3:] = True
    gen = torch.Generator().manual_seed(0)
    assert not forward_mask(answer, torch.tensor([0.0, 0.0]), gen).any()
    full = forward_mask(answer, torch.tensor([1.0, 1.0]), gen)
    assert torch.equal(full, answer)  # t = 1 masks every answer position and never a prompt position
    many = forward_mask(torch.ones(1, 4000, dtype=torch.bool), torch.tensor([0.3]), gen)
    assert abs(many.float().mean().item() - 0.3) < 0.03


def test_save_and_load_round_trip_and_refusals(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    loaded = load_mdlm(tmp_path / "m", 4, 9, "where")
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 5, 5, 5]])
    with torch.no_grad():
        assert torch.allclose(token_logits(model, tokens), token_logits(loaded, tokens))
    with pytest.raises(ValueError, match="vocab_size 6; the task needs 7"):
        load_mdlm(tmp_path / "m", 5, 9, "where")
    with pytest.raises(ValueError, match="lower masked_diffusion.task.length"):
        load_mdlm(tmp_path / "m", 4, 99, "where")
    with pytest.raises(ValueError, match="has no config.json"):
        load_mdlm(tmp_path, 4, 9, "where")
