"""1x8, 4x2 and 8x1 gradient accumulation give the same gradient (uneven token counts on purpose)."""

import random

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import LossConfig, LossTerm
from stillroom.data.batch import Example, collate
from stillroom.losses import LossMix
from stillroom.domains.lm.forward import StudentForward
from stillroom.teachers.signal import OnlineTeacher
from stillroom.train.loop import forward_backward
from stillroom.train.loop import DistillObjective, Player

V = 64


def _examples():
    rng = random.Random(0)
    out = []
    for i in range(8):
        n = rng.randint(6, 20)
        ids = [rng.randrange(2, V) for _ in range(n)]
        start = rng.randint(1, n - 2)  # a prompt of varying length: uneven target counts per example
        out.append(Example(ids, [False] * start + [True] * (n - start), uid=str(i)))
    return out


def _grads(micro_size: int, terms, fused: bool):
    student = tiny_llama(V, layers=2, seed=1)
    student.train()
    teacher = OnlineTeacher(tiny_llama(V, layers=3, seed=2), vocab_size=V)
    mix = LossMix(LossConfig(terms=terms, chunk_tokens=7, fused=fused))
    forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=V)
    player = Player("student", student, DistillObjective(forward, mix, teacher))
    exs = _examples()
    micro = [collate(exs[i : i + micro_size], pad_id=1) for i in range(0, 8, micro_size)]
    total = sum(b.num_targets for b in micro)
    forward_backward(micro, player, forward, device=torch.device("cpu"), precision="fp32", scale=1.0 / total)
    return [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("terms", [[LossTerm(name="forward_kl")], [LossTerm(name="ce", weight=0.5), LossTerm(name="reverse_kl")]])
def test_accumulation_invariance(terms, fused):
    ref = _grads(8, terms, fused)
    for size in (2, 1):
        got = _grads(size, terms, fused)
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
