"""train.compile: one training step with the student's forward compiled equals the eager step (loss and
gradients within fp32 tolerance) on a tiny model; combinations it breaks are refused before step 0."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import LossConfig, LossTerm
from stillroom.data.batch import Example, collate
from stillroom.domains.lm.forward import StudentForward
from stillroom.losses import LossMix
from stillroom.teachers.signal import OnlineTeacher
from stillroom.train.compile import compile_forward
from stillroom.train.loop import DistillObjective, Player, forward_backward

V = 64


def _batches():
    """Two micro-batches of one shape and different tokens (the second must not recompile the forward)."""
    g = torch.Generator().manual_seed(0)
    return [collate([Example(torch.randint(2, V, (12,), generator=g).tolist(), [False] * 3 + [True] * 9, uid=f"{k}{i}")
                     for i in range(3)], pad_id=1) for k in range(2)]


def _step(fused: bool, compiled: bool):
    student = tiny_llama(V, layers=2, seed=1).train()
    teacher = OnlineTeacher(tiny_llama(V, layers=2, seed=2), vocab_size=V)
    mix = LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce", weight=0.5)], fused=fused,
                             chunk_tokens=8))
    forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=V)
    if compiled:
        compile_forward(forward)
    player = Player("student", student, DistillObjective(forward, mix, teacher))
    loss, _, _ = forward_backward(_batches(), player, forward, device=torch.device("cpu"), precision="fp32", scale=0.01)
    return loss, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_a_compiled_step_equals_the_eager_step(fused):
    torch._dynamo.reset()
    eager_loss, eager_grads = _step(fused, compiled=False)
    loss, grads = _step(fused, compiled=True)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
