"""Shared builders for the loss tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

import stillroom.losses as L
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


def assert_plain_chunked_fused_agree(terms, hidden, head, teacher, mask, *, atol=1e-6, **kw) -> None:
    """``terms`` give the same total, count and gradients (to ``hidden`` and to the head's weight and bias) on
    the plain path (head(hidden) -> logits), the chunked one and the fused one (hidden -> head per chunk of 4)."""

    def grads(fn):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        total, parts, count = fn(h)
        total.backward()
        return total.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone(), count

    plain = grads(lambda h: L.run_logit_terms(terms, head(h), teacher, mask, **kw))
    chunked = grads(lambda h: L.run_logit_terms(terms, head(h), teacher, mask, chunk_tokens=4, **kw))
    fused = grads(lambda h: L.run_fused_logit_terms(terms, h, head, teacher, mask, chunk_tokens=4, **kw))
    for other in (chunked, fused):
        for a, b in zip(plain, other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def topk_signal(teacher_logits, k, temperature=1.0):
    logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return TeacherSignal(topk_ids_btk=ids, topk_logprobs_btk=vals, tail_logmass_bt=tail_logmass(vals),
                         temperature=temperature)
