"""dParallel: the certainty-forcing loss by hand (the empty-correct case included), complementary masks that cover
the active block exactly once, masks drawn from (seed, step, example) alone, and the CE-only limit."""

import math

import pytest
import torch

from stillroom.domains.masked_diffusion.task import MdBatch
from stillroom.methods.dparallel import certainty_forcing_loss, complementary_masks, pair_batch, pass_terms

LN3 = math.log(3.0)


def _h(*p):
    return -sum(x * math.log(x) for x in p)


def test_loss_matches_a_hand_computation():
    # one example, 3 positions, vocabulary 2; the active block is positions 1-2: M = {1}, not M = {2}
    targets = torch.tensor([[0, 1, 1]])
    f64 = torch.float64
    logits_m = torch.tensor([[[0.0, 0.0], [0.0, LN3], [0.0, 0.0]]], dtype=f64)  # position 1: p = (1/4, 3/4), right
    logits_c = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]]], dtype=f64)  # position 2: p = (3/4, 1/4), wrong
    sup_m, sup_c = torch.tensor([[False, True, False]]), torch.tensor([[False, False, True]])
    total, count, parts = certainty_forcing_loss(logits_m, logits_c, targets, sup_m, sup_c, beta=2.0, temperature=0.5)
    ce = -math.log(0.75) - math.log(0.25)
    cert = _h(0.1, 0.9)  # softmax([0, ln 3] / 0.5) = (1/10, 9/10); pass C has no correct position: 0
    assert total.item() == pytest.approx(ce + 2.0 * cert, rel=1e-9) and count == 1
    assert parts["ce"] == pytest.approx(ce, rel=1e-9) and parts["cert"] == pytest.approx(cert, rel=1e-9)


def test_means_are_per_example_and_summed_over_examples():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 4)
    targets = torch.randint(0, 4, (3, 5))
    sup = torch.rand(3, 5) < 0.6
    sup[:, 0] = True
    ce_b, cert_b = pass_terms(logits, targets, sup, 0.5)
    for b in range(3):
        ce = torch.nn.functional.cross_entropy(logits[b][sup[b]], targets[b][sup[b]])
        assert ce_b[b].item() == pytest.approx(ce.item(), rel=1e-6)
    total, count, _ = certainty_forcing_loss(logits, logits, targets, sup, sup, beta=0.0, temperature=0.5)
    assert count == 3 and total.item() == pytest.approx(2 * ce_b.sum().item(), rel=1e-6)


def test_no_correct_or_no_supervised_position_gives_zero_and_keeps_the_graph():
    logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]], requires_grad=True)
    targets = torch.tensor([[1, 1]])  # argmax is 0 everywhere: nothing is correct
    sup = torch.tensor([[True, True]])
    ce_b, cert_b = pass_terms(logits, targets, sup, 0.5)
    assert cert_b.item() == 0.0 and ce_b.item() == pytest.approx(-math.log(1 / (1 + math.e ** 2)), rel=1e-6)
    empty = torch.zeros(1, 2, dtype=torch.bool)
    total, _, _ = certainty_forcing_loss(logits, logits, targets, empty, empty, beta=2.0, temperature=0.5)
    assert total.item() == 0.0
    total.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_complementary_masks_cover_the_active_block_exactly_once():
    length, start, block = 21, 5, 4  # an answer of 16 tokens: 4 blocks
    seen_blocks = set()
    for seed in range(60):
        m, c, active = complementary_masks(length, start, block, 0.5, torch.Generator().manual_seed(seed))
        idx = active.nonzero().flatten()
        assert len(idx) == block and (idx[0] - start) % block == 0
        seen_blocks.add(int(idx[0] - start) // block)
        sup_m, sup_c = m & active, c & active
        assert torch.equal(sup_m ^ sup_c, active) and not (sup_m & sup_c).any()
        end = int(idx[-1]) + 1
        assert m[end:].all() and c[end:].all()  # later blocks: masked in both passes
        assert not m[:int(idx[0])].any() and not c[:int(idx[0])].any()  # prompt and earlier blocks: clean
    assert seen_blocks == {0, 1, 2, 3}


def test_a_short_last_block_is_covered_too():
    m, c, active = complementary_masks(10, 3, 4, 0.5, torch.Generator().manual_seed(2))
    assert active.sum() in (4, 3) and torch.equal((m & active) ^ (c & active), active)


def test_masks_depend_on_seed_step_and_example_only():
    tokens = torch.randint(0, 4, (3, 13))
    batch = MdBatch(tokens, 7, ["a", "b", "c"])
    one, again = pair_batch(batch, 5, 2, 0.5, seed=1, step=4), pair_batch(batch, 5, 2, 0.5, seed=1, step=4)
    assert torch.equal(one.noisy_m, again.noisy_m) and torch.equal(one.sup_c, again.sup_c)
    reordered = pair_batch(MdBatch(tokens[[2, 0, 1]], 7, ["c", "a", "b"]), 5, 2, 0.5, seed=1, step=4)
    assert torch.equal(reordered.sup_m[1], one.sup_m[0])  # example "a" draws the same wherever it sits
    other = [pair_batch(batch, 5, 2, 0.5, seed=1, step=s).sup_m for s in range(5, 9)]
    assert any(not torch.equal(o, one.sup_m) for o in other)
    assert (one.noisy_m[one.sup_m] == 5).all() and torch.equal(one.noisy_m[~(one.noisy_m == 5)],
                                                                tokens[~(one.noisy_m == 5)])
    assert one.num_targets == 3
