"""loss.kernel=liger: the glue to Liger-Kernel's fused linear distillation loss.

On CPU a module with ``LigerFusedLinearJSDLoss``'s interface and documented arithmetic (means over the labels
that are not ignore_index, clamped to 1; CE at temperature 1; JSD with Liger's beta) proves the mapping of terms,
weights, temperature and reductions against our fused path: it proves the glue, not the kernel. On CUDA with
liger-kernel installed the real kernel is compared with our fused path on a tiny model (values and gradients).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import LossMix, OutputHead, StudentOutput
from stillroom.domains.lm.head_teacher import liger_teacher
from stillroom.losses.liger import LigerLoss, plan_liger
from stillroom.teachers.signal import TeacherHidden

V, D_S, D_T = 37, 8, 12


class LigerShaped(torch.nn.Module):
    """``LigerFusedLinearJSDLoss``'s constructor and call, its arithmetic in plain autograd (liger-kernel 0.8.5,
    ``chunked_loss/fused_linear_distillation.py`` and ``jsd_loss.py``)."""

    def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0,
                 compiled=True, chunk_size=1024, return_soft_hard_loss=False):
        super().__init__()
        self.wh, self.ws, self.beta = weight_hard_loss, weight_soft_loss, beta
        self.ignore, self.t = ignore_index, temperature
        self.split = return_soft_hard_loss

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias=None,
                teacher_bias=None):
        s = F.linear(student_input, student_weight, student_bias)
        with torch.no_grad():
            t = F.linear(teacher_input, teacher_weight, teacher_bias)
        keep = true_labels != self.ignore
        n = keep.sum().clamp_min(1)
        hard = F.nll_loss(F.log_softmax(s.float(), -1), true_labels, reduction="sum", ignore_index=self.ignore) / n
        ls, lt = F.log_softmax(s / self.t, -1), F.log_softmax(t / self.t, -1)
        if self.beta == 0:
            rows = F.kl_div(ls, lt, reduction="none", log_target=True)
        elif self.beta == 1:
            rows = F.kl_div(lt, ls, reduction="none", log_target=True)
        else:
            lm = torch.logsumexp(torch.stack([ls + math.log(1 - self.beta), lt + math.log(self.beta)]), 0)
            rows = self.beta * F.kl_div(lm, lt, reduction="none", log_target=True) + \
                (1 - self.beta) * F.kl_div(lm, ls, reduction="none", log_target=True)
        soft = rows.sum(-1).masked_fill(~keep, 0.0).sum() / n
        loss = self.wh * hard + self.ws * soft
        return (loss, soft, hard) if self.split else loss


def _inputs(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, D_S, generator=g, requires_grad=True)
    weight = torch.randn(V, D_S, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    t_hidden, t_weight = torch.randn(2, 6, D_T, generator=g), torch.randn(V, D_T, generator=g)
    t_bias = torch.randn(V, generator=g)
    targets = torch.randint(0, V, (2, 6), generator=g)
    targets[0, :2] = -100  # a prompt
    targets[1, -1] = -100
    return hidden, weight, b, TeacherHidden(t_hidden, t_weight, t_bias), targets


MIXES = {
    "forward_kl": dict(terms=[LossTerm(name="forward_kl")]),
    "reverse_kl_weighted": dict(terms=[LossTerm(name="reverse_kl", weight=0.7)]),
    "jsd_and_ce_hot": dict(terms=[LossTerm(name="ce", weight=0.25),
                                  LossTerm(name="jsd", weight=2.0, params={"beta": 0.3})],
                           loss_temperature=2.0, scale_by_temperature_squared=True),
    "kl_weight_zero_and_ce": dict(terms=[LossTerm(name="forward_kl", weight=0.0), LossTerm(name="ce")]),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_the_liger_glue_equals_our_fused_path(mix):
    cfg = LossConfig(**MIXES[mix], chunk_tokens=4)
    hidden, weight, bias, teacher, targets = _inputs()
    mask = targets != -100
    liger = LigerLoss(plan_liger(cfg), LigerShaped(**plan_liger(cfg).module_kwargs()))
    total, parts = liger(StudentOutput(hidden_btd=hidden, head=OutputHead(weight, bias)), teacher, targets, mask)
    grads = torch.autograd.grad(total, (hidden, weight, bias))

    t_logits = F.linear(teacher.hidden_btd, teacher.weight, teacher.bias)
    ours = LossMix(cfg)(StudentOutput(hidden_btd=hidden, head=OutputHead(weight, bias)), t_logits, targets, mask)
    ref = torch.autograd.grad(ours.total, (hidden, weight, bias))
    torch.testing.assert_close(total, ours.total, rtol=1e-5, atol=1e-5)
    assert parts.keys() == ours.parts.keys()
    for k in parts:
        assert parts[k] == pytest.approx(ours.parts[k], rel=1e-5, abs=1e-5), k
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_no_counted_token_gives_a_zero_sum_with_zero_gradients():
    cfg = LossConfig(terms=[LossTerm(name="forward_kl")])
    hidden, weight, bias, teacher, targets = _inputs()
    liger = LigerLoss(plan_liger(cfg), LigerShaped(**plan_liger(cfg).module_kwargs()))
    total, parts = liger(StudentOutput(hidden_btd=hidden, head=OutputHead(weight, bias)), teacher, targets,
                         torch.zeros_like(targets, dtype=torch.bool))
    assert float(total.detach()) == 0.0 and parts == {"forward_kl": 0.0}
    total.backward()
    assert not hidden.grad.any() and not weight.grad.any()


@pytest.mark.parametrize("terms, fused", [
    ([LossTerm(name="tvd")], True),
    ([LossTerm(name="forward_kl"), LossTerm(name="reverse_kl")], True),
    ([LossTerm(name="ce")], True),
    ([LossTerm(name="forward_kl"), LossTerm(name="hidden_mse")], True),
])
def test_mixes_liger_does_not_compute_are_refused_naming_what_it_does(terms, fused):
    with pytest.raises(ValueError, match=r"loss.kernel=liger computes one of forward_kl, reverse_kl, jsd .*"
                                         r"optionally with ce.*loss.kernel=stillroom"):
        plan_liger(LossConfig(terms=terms, fused=fused, kernel="liger"))


def test_the_plain_path_is_refused():
    with pytest.raises(ValueError, match="loss.fused=true"):
        plan_liger(LossConfig(fused=False, kernel="liger"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_choice_is_refused_before_step_0_naming_the_extra():
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*pip install 'stillroom\[gpu\]'"):
        LossMix(LossConfig(kernel="liger"))
    LossMix(LossConfig(kernel="stillroom"))  # the default needs neither


def test_token_weights_and_other_teachers_are_refused():
    cfg = LossConfig(terms=[LossTerm(name="forward_kl")])
    hidden, weight, bias, teacher, targets = _inputs()
    liger = LigerLoss(plan_liger(cfg), LigerShaped(**plan_liger(cfg).module_kwargs()))
    with pytest.raises(ValueError, match="no per-token weights.*loss.kernel=stillroom"):
        liger(StudentOutput(hidden_btd=hidden, head=OutputHead(weight, bias)), teacher, targets, targets != -100,
              torch.ones(targets.shape))
    run = SimpleNamespace(teacher=SimpleNamespace(source="store", tokenizer_mode="same"))
    with pytest.raises(ValueError, match="dense online teacher.*teacher.source=store"):
        liger_teacher(run, object())


@pytest.mark.gpu
def test_liger_kernel_equals_our_fused_path_on_cuda():
    pytest.importorskip("liger_kernel", reason="needs the extra: pip install 'stillroom[gpu]'")
    from stillroom.domains.lm.forward import StudentForward
    from stillroom.teachers.signal import OnlineTeacher

    vocab = 97
    student = tiny_llama(vocab, layers=2, seed=0, tie=False).cuda().train()
    teacher_model = tiny_llama(vocab, layers=3, hidden=48, seed=1).cuda()
    ids = torch.randint(0, vocab, (3, 40), device="cuda")
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[0, :5] = -100
    batch = SimpleNamespace(model_inputs=lambda: {"input_ids": ids})
    forward = StudentForward(student, fused=True, hidden_layers=[], vocab=vocab)
    results = {}
    for kernel in ("stillroom", "liger"):
        cfg = LossConfig(terms=[LossTerm(name="ce", weight=0.5), LossTerm(name="jsd", params={"beta": 0.4})],
                         loss_temperature=1.5, chunk_tokens=32, kernel=kernel)
        online = OnlineTeacher(teacher_model, vocab_size=vocab, output_device="cuda")
        run = SimpleNamespace(teacher=SimpleNamespace(source="online", tokenizer_mode="same"))
        source = liger_teacher(run, online) if kernel == "liger" else online
        out = forward(batch)
        out["hidden"].retain_grad()
        result = LossMix(cfg)(StudentOutput(hidden_btd=out["hidden"], head=out["head"]), source.signal(batch),
                              targets, targets != -100)
        student.zero_grad()
        result.total.backward()
        results[kernel] = (result.total.detach(), result.parts, out["hidden"].grad.clone(),
                           student.lm_head.weight.grad.clone())
    (t0, p0, h0, w0), (t1, p1, h1, w1) = results["stillroom"], results["liger"]
    torch.testing.assert_close(t1, t0, rtol=1e-4, atol=1e-4)
    assert p1 == pytest.approx(p0, rel=1e-4)
    torch.testing.assert_close(h1, h0, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w1, w0, rtol=1e-3, atol=1e-5)
