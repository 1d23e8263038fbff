"""Shared builders for the loss tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from stillroom.teachers.signal import TeacherSignal, tail_logmass


def make_inputs(b=2, t=5, v=11, d=6, *, dtype=torch.float32, seed=0, scale=2.0):
    """Hidden [B,T,D], head Linear(D,V) with bias, teacher logits [B,T,V], mask [B,T], targets [B,T]."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, d, generator=g) * 1.5).to(dtype)
    head = torch.nn.Linear(d, v, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g).to(dtype))
        head.bias.copy_(torch.randn(v, generator=g).to(dtype) * 0.1)
    teacher = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[~mask] = -100
    return hidden, head, teacher, mask, targets


def topk_signal(teacher_logits, k, temperature=1.0):
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return TeacherSignal(topk_ids_btk=ids, topk_logprobs_btk=vals, tail_logmass_bt=tail_logmass(vals),
                         temperature=temperature)
