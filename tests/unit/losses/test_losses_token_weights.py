"""Per-token weights (Batch.target_weight): plain == chunked == fused, ones == no weights,
and a weighted sum equals the hand-weighted per-token values."""

from __future__ import annotations

import pytest
import torch

import stillroom.losses as L
from losses_helpers import assert_plain_chunked_fused_agree, make_inputs
from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import LossMix, StudentOutput

NAMES = ["ce", "forward_kl", "jsd", "tvd_pp"]


@pytest.mark.parametrize("name", NAMES)
def test_weighted_paths_agree(name):
    hidden, head, teacher, mask, targets = make_inputs(b=3, t=7, v=17, d=8)
    weight = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))  # signed (REDI uses negative ones)
    terms = [L.make_logit_term(name, {})]
    # Signed weights of up to ~3 make sums that cancel: fp32 rounding of the paths' different orders reaches ~2e-6.
    assert_plain_chunked_fused_agree(terms, hidden, head, teacher, mask, target_ids=targets, weight_bt=weight,
                                     atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_unit_weights_change_nothing_and_weights_multiply_per_token(name):
    _, _, teacher, mask, targets = make_inputs(b=2, t=5, v=11)
    student = torch.randn(2, 5, 11)
    terms = [L.make_logit_term(name, {})]
    base, _, n = L.run_logit_terms(terms, student, teacher, mask, target_ids=targets)
    ones, _, n1 = L.run_logit_terms(terms, student, teacher, mask, target_ids=targets, weight_bt=torch.ones(2, 5))
    torch.testing.assert_close(base, ones)
    assert n == n1
    if name == "tvd_pp":
        return  # its per-token value depends on batch statistics; covered by the parity test above
    weight = torch.rand(2, 5) * 3
    weighted, _, _ = L.run_logit_terms(terms, student, teacher, mask, target_ids=targets, weight_bt=weight)
    by_hand = torch.zeros(())
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                one = torch.zeros_like(mask)
                one[b, t] = True
                v, _, _ = L.run_logit_terms(terms, student, teacher, one, target_ids=targets)
                by_hand = by_hand + weight[b, t] * v
    torch.testing.assert_close(weighted, by_hand, rtol=1e-5, atol=1e-6)


def test_mix_refuses_weights_for_hidden_terms_and_wrong_shapes():
    _, _, teacher, mask, targets = make_inputs(b=2, t=5, v=11)
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    out = StudentOutput(logits_btv=torch.randn(2, 5, 11))
    with pytest.raises(ValueError, match="token weights of shape"):
        mix(out, None, targets, mask, torch.ones(2, 4))
    hmix = LossMix(LossConfig(terms=[LossTerm(name="ce"), LossTerm(name="squarehead", params={"layers": "last"})]),
                   student_layers=2, teacher_layers=2)
    with pytest.raises(ValueError, match="does not take per-token weights"):
        hmix(StudentOutput(logits_btv=torch.randn(2, 5, 11), hidden_states={2: torch.randn(2, 5, 4)}), teacher,
             targets, mask, torch.ones(2, 5))
