"""hidden_smooth_l1 (EAGLE / SpecVLM feature regression): the hand-computed value, the projector for different
widths, masking, and its registration as a term of the loss mix."""

import torch

from stillroom.config.core import LossConfig, LossTerm
from stillroom.losses import LossMix
from stillroom.losses.hidden import hidden_smooth_l1
from stillroom.losses.mix import StudentOutput
from stillroom.teachers.signal import TeacherSignal


def test_value_by_hand_with_both_branches_and_the_mask():
    hs = {1: torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])}  # [B=1, T=2, D=2]
    ht = {1: torch.tensor([[[0.5, 0.0], [9.0, 9.0]]])}
    mask = torch.tensor([[True, False]])
    value, count = hidden_smooth_l1(hs, ht, mask, layer_map=[(1, 1)], beta=1.0)
    # token 0: |d| = 0.5 -> 0.5 * 0.25 / 1 = 0.125; |d| = 3 -> 3 - 0.5 = 2.5; mean over d = 1.3125
    assert count == 1 and torch.isclose(value, torch.tensor(1.3125))
    half, _ = hidden_smooth_l1(hs, ht, mask, layer_map=[(1, 1)], beta=2.0)
    assert torch.isclose(half, torch.tensor((0.25 * 0.5 / 2 + (3 - 1.0)) / 2))  # 0.0625 -> mean (0.0625, 2)


def test_mix_adds_a_projection_and_trains_it():
    torch.manual_seed(0)
    terms = [LossTerm(name="soft_ce", weight=0.1), LossTerm(name="hidden_smooth_l1", params={"layers": "last"})]
    mix = LossMix(LossConfig(terms=terms, fused=False), student_hidden=4, teacher_hidden=6, student_layers=1,
                  teacher_layers=2)
    assert list(mix.projections) == ["t1_s1"] and mix.student_hidden_layers == [1] and mix.teacher_hidden_layers == [2]
    logits = torch.randn(2, 3, 5, requires_grad=True)
    student = StudentOutput(logits_btv=logits, hidden_states={1: torch.randn(2, 3, 4, requires_grad=True)})
    signal = TeacherSignal(logits_btv=torch.randn(2, 3, 5), hidden_states={2: torch.randn(2, 3, 6)})
    targets = torch.randint(0, 5, (2, 3))
    result = mix(student, signal, targets, torch.ones(2, 3, dtype=torch.bool))
    result.total.backward()
    assert mix.projections["t1_s1"].weight.grad is not None and logits.grad is not None
    assert set(result.parts) == {"soft_ce", "hidden_smooth_l1"}
