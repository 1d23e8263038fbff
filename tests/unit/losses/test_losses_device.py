"""Every tensor the losses create lives on the inputs' device, never on the default device.

On CUDA, a running total created with a plain ``torch.zeros(...)`` sits on the CPU while the
chunk results are on the GPU: the chunked/fused paths fail at step 0. Without a GPU the same
mistake is made visible by making the *default* device differ from the inputs' one: inputs on
the CPU, default device ``meta`` (tensors without data). A tensor made without ``device=`` then
lands on ``meta`` and either raises when mixed with the CPU inputs or turns the result into a
``meta`` tensor; done right, results are on the CPU and equal to the ordinary run.
"""

from __future__ import annotations

import pytest
import torch

import stillroom.losses as L
from losses_helpers import make_inputs, topk_signal
from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import LossMix, StudentOutput
from stillroom.teachers.signal import TeacherSignal


def _both(fn):
    """``fn()`` run normally and with ``meta`` as the default device: (reference, under meta)."""
    ref = fn()
    with torch.device("meta"):
        out = fn()
    return ref, out


def _check(ref: torch.Tensor, out: torch.Tensor) -> None:
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


TEACHERS = {
    "dense": lambda t: t,
    "ensemble": lambda t: [t, t.flip(-1)],
    "topk": lambda t: topk_signal(t, 4),
}


@pytest.mark.parametrize("teacher_kind", list(TEACHERS))
@pytest.mark.parametrize("path", ["plain", "chunked", "fused"])
def test_logit_paths_keep_the_inputs_device(path, teacher_kind):
    hidden, head, teacher_logits, mask, targets = make_inputs(b=3, t=5, v=11, d=6)
    teacher = TEACHERS[teacher_kind](teacher_logits)
    names = ["ce", "forward_kl", "tvd_pp"] + (["taid"] if teacher_kind != "topk" else [])
    terms = [L.make_logit_term(n, {"scope": "batch"} if n == "tvd_pp" else {}) for n in names]

    def run():
        h = hidden.clone().requires_grad_(True)
        kw = dict(target_ids=targets, weight_bt=torch.ones(3, 5, device="cpu"))
        if path == "fused":
            total, parts, _ = L.run_fused_logit_terms(terms, h, head, teacher, mask, chunk_tokens=4, **kw)
        else:
            total, parts, _ = L.run_logit_terms(terms, head(h), teacher, mask,
                                                chunk_tokens=4 if path == "chunked" else None, **kw)
        (g,) = torch.autograd.grad(total, h)
        return total.detach(), torch.stack(parts), g

    for ref, out in zip(*_both(run)):
        _check(ref, out)


def test_mix_and_hidden_terms_keep_the_inputs_device():
    b, t, v = 2, 4, 9
    _, _, teacher_logits, mask, targets = make_inputs(b=b, t=t, v=v)
    g = torch.Generator().manual_seed(0)
    st_hidden = {i: torch.randn(b, t, 5, generator=g) for i in (1, 2)}
    te_hidden = {i: torch.randn(b, t, 5, generator=g) for i in (2, 4)}
    st_att = {1: torch.softmax(torch.randn(b, 2, t, t, generator=g), -1)}
    te_att = {3: torch.softmax(torch.randn(b, 2, t, t, generator=g), -1)}
    signal = TeacherSignal(logits_btv=teacher_logits, hidden_states=te_hidden, attentions=te_att)
    logits = torch.randn(b, t, v, generator=g)
    cfg = LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="taid"), LossTerm(name="ce", weight=0.5),
                            LossTerm(name="squarehead", weight=0.1, params={"layers": [[1, 2], [2, 4]]}),
                            LossTerm(name="hidden_cosine", weight=0.2),
                            LossTerm(name="attention_mse", weight=0.3, params={"layers": "last"})],
                     chunk_tokens=3)
    mix = LossMix(cfg, student_hidden=5, teacher_hidden=5, student_layers=2, teacher_layers=4)

    def run():
        lg = logits.clone().requires_grad_(True)
        res = mix(StudentOutput(logits_btv=lg, hidden_states=st_hidden, attentions=st_att), signal, targets, mask)
        (grad,) = torch.autograd.grad(res.total, lg)
        return res.total.detach(), grad

    for ref, out in zip(*_both(run)):
        _check(ref, out)
    # The hidden-state terms alone (their accumulators), including an empty mask.
    for fn in (L.squarehead, L.hidden_mse, L.hidden_cosine):
        for m in (mask, torch.zeros_like(mask)):
            ref, out = _both(lambda: fn(st_hidden, {1: te_hidden[2], 2: te_hidden[4]}, m)[0])
            _check(ref, out)
    ref, out = _both(lambda: L.attention_mse(st_att, {1: te_att[3]}, mask)[0])
    _check(ref, out)
