"""Invariants of every registered divergence (parametrised over stillroom.losses.DIVERGENCES)."""

from __future__ import annotations

import math

import pytest
import torch

import stillroom.losses as L
from losses_helpers import assert_plain_chunked_fused_agree, make_inputs

DIV = L.DIVERGENCES
# TAID's target and TVD++'s reward are stop-gradient by design: finite differences of the
# value do not equal the training gradient, so they get closed-form gradient tests instead.
SMOOTH = [n for n in DIV if n not in ("taid", "tvd_pp")]


def call(name, s, t, m, **kw):
    return L.get_term(name).fn(s, t, m, **kw)


@pytest.mark.parametrize("name", DIV)
def test_non_negative_and_zero_iff_equal(name):
    _, _, teacher, mask, _ = make_inputs(b=3, t=4, v=13)
    student = torch.randn(3, 4, 13) * 2
    value, count = call(name, student, teacher, mask)
    assert count == int(mask.sum())
    assert value.item() > 1e-3
    same, _ = call(name, teacher.clone(), teacher, mask)
    assert abs(same.item()) < 1e-5
    # Per token, a different distribution on a single position is detected.
    m1 = torch.zeros_like(mask)
    m1[0, 0] = True
    assert call(name, student, teacher, m1)[0].item() > 0


@pytest.mark.parametrize("name", SMOOTH)
def test_gradcheck_float64(name):
    _, _, teacher, mask, _ = make_inputs(b=1, t=3, v=5, dtype=torch.float64, seed=3)
    student = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    for chunk in (None, 2):
        assert torch.autograd.gradcheck(lambda s: call(name, s, teacher, mask, chunk_tokens=chunk)[0], (student,))


def test_taid_gradient_is_q_minus_target():
    _, _, teacher, mask, _ = make_inputs(b=2, t=3, v=7, dtype=torch.float64)
    student = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = 0.3
    value, _ = L.taid(student, teacher, mask, t=t)
    (grad,) = torch.autograd.grad(value, student)
    logq, logp = torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1)
    p_t = torch.softmax((1 - t) * logq + t * logp, -1)
    expected = (logq.exp() - p_t) * mask.unsqueeze(-1)
    torch.testing.assert_close(grad, expected)
    # Value is KL(p_t || q).
    kl = (p_t * (p_t.log() - logq)).sum(-1)[mask].sum()
    torch.testing.assert_close(value, kl)


@pytest.mark.parametrize("weighting", ["expectation", "unweighted"])
def test_tvd_pp_gradient_is_the_surrogate(weighting):
    _, _, teacher, mask, _ = make_inputs(b=2, t=3, v=7, dtype=torch.float64)
    student = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    value, _ = L.tvd_pp(student, teacher, mask, weighting=weighting)
    (grad,) = torch.autograd.grad(value, student)
    s = student.detach().clone().requires_grad_(True)
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(teacher, -1)
    r = (logp > logq).double()
    r_hat = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-5)
    if weighting == "expectation":
        sur = -(r_hat * logq.exp()).sum(-1)
    else:
        sur = -(r_hat * logq).mean(-1)
    sur[mask].sum().backward()
    torch.testing.assert_close(grad, s.grad)
    tv = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)[mask].sum()
    torch.testing.assert_close(value, tv.detach())


def test_tvd_pp_equal_distributions_have_zero_gradient_and_descent_reduces_tvd():
    _, _, teacher, mask, _ = make_inputs(b=2, t=4, v=9)
    s = teacher.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L.tvd_pp(s, teacher, mask)[0], s)
    assert torch.all(g == 0)
    s = torch.zeros_like(teacher, requires_grad=True)
    before = L.tvd(s, teacher, mask)[0].item()
    (g,) = torch.autograd.grad(L.tvd_pp(s, teacher, mask)[0], s)
    after = L.tvd(s.detach() - 0.5 * g, teacher, mask)[0].item()
    assert after < before


def test_tvd_pp_batch_scope_chunked_equals_plain():
    hidden, head, teacher, mask, _ = make_inputs(b=3, t=5, v=9)
    s = head(hidden).detach().requires_grad_(True)
    a, _ = L.tvd_pp(s, teacher, mask, scope="batch")
    (ga,) = torch.autograd.grad(a, s)
    b, _ = L.tvd_pp(s, teacher, mask, scope="batch", chunk_tokens=4)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


# p = [0.5, 0.5] (teacher), q = [0.25, 0.75] (student), by hand.
P, Q = [0.5, 0.5], [0.25, 0.75]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _hand(name):
    if name == "forward_kl":
        return 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    if name == "reverse_kl":
        return 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    if name == "jsd":  # beta 0.5: m = [0.375, 0.625]
        m = [0.375, 0.625]
        return 0.5 * _kl(P, m) + 0.5 * _kl(Q, m)
    if name in ("tvd", "tvd_pp"):
        return 0.25
    if name == "skew_kl":  # 0.1 p + 0.9 q
        return 0.5 * math.log(0.5 / 0.275) + 0.5 * math.log(0.5 / 0.725)
    if name == "skew_rkl":  # 0.9 p + 0.1 q
        return 0.25 * math.log(0.25 / 0.475) + 0.75 * math.log(0.75 / 0.525)
    if name == "taid":  # t = 0.4: p_t ~ q^0.6 p^0.4
        u = [0.25**0.6 * 0.5**0.4, 0.75**0.6 * 0.5**0.4]
        pt = [x / sum(u) for x in u]
        return _kl(pt, Q)
    raise KeyError(name)


@pytest.mark.parametrize("name", DIV)
def test_hand_computed_value(name):
    student = torch.tensor(Q).log().view(1, 1, 2)
    teacher = torch.tensor(P).log().view(1, 1, 2) + 3.0  # a constant shift changes nothing
    value, count = call(name, student, teacher, torch.ones(1, 1, dtype=torch.bool))
    assert count == 1
    assert value.item() == pytest.approx(_hand(name), rel=1e-5, abs=1e-7)


def test_hand_computed_ce_and_soft_ce():
    student = torch.tensor(Q).log().view(1, 1, 2)
    teacher = torch.tensor(P).log().view(1, 1, 2)
    m = torch.ones(1, 1, dtype=torch.bool)
    assert L.ce(student, None, m, target_ids=torch.tensor([[1]]))[0].item() == pytest.approx(-math.log(0.75))
    assert L.soft_ce(student, teacher, m)[0].item() == pytest.approx(-0.5 * math.log(0.25) - 0.5 * math.log(0.75))
    # MEAL V2: two teachers average their probabilities: [0.5,0.5] and [0.9,0.1] -> [0.7, 0.3].
    t2 = torch.tensor([0.9, 0.1]).log().view(1, 1, 2)
    want = -0.7 * math.log(0.25) - 0.3 * math.log(0.75)
    assert L.soft_ce(student, [teacher, t2], m)[0].item() == pytest.approx(want, rel=1e-6)


def test_soft_ce_minus_entropy_is_forward_kl():
    _, _, teacher, mask, _ = make_inputs()
    student = torch.randn_like(teacher)
    logp = torch.log_softmax(teacher, -1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].sum()
    torch.testing.assert_close(L.soft_ce(student, teacher, mask)[0] - entropy, L.forward_kl(student, teacher, mask)[0])


def test_jsd_beta_limits():
    _, _, teacher, mask, _ = make_inputs(dtype=torch.float64)
    student = torch.randn_like(teacher)
    fkl, rkl = L.forward_kl(student, teacher, mask)[0], L.reverse_kl(student, teacher, mask)[0]
    torch.testing.assert_close(L.jsd(student, teacher, mask, beta=0.0)[0], fkl)
    torch.testing.assert_close(L.jsd(student, teacher, mask, beta=1.0)[0], rkl)
    # Near the ends the formula behaves like beta * KL(p||q) and (1 - beta) * KL(q||p).
    eps = 1e-5
    assert L.jsd(student, teacher, mask, beta=eps)[0].item() / eps == pytest.approx(fkl.item(), rel=1e-3)
    assert L.jsd(student, teacher, mask, beta=1 - eps)[0].item() / eps == pytest.approx(rkl.item(), rel=1e-3)
    # Symmetric at 0.5 and bounded by log 2 per token.
    a = L.jsd(student, teacher, mask, beta=0.5)[0]
    torch.testing.assert_close(a, L.jsd(teacher, student, mask, beta=0.5)[0])
    assert a.item() <= math.log(2) * int(mask.sum())


def test_skew_alpha_limits():
    _, _, teacher, mask, _ = make_inputs(dtype=torch.float64)
    student = torch.randn_like(teacher)
    torch.testing.assert_close(L.skew_kl(student, teacher, mask, alpha=0.0)[0], L.forward_kl(student, teacher, mask)[0])
    torch.testing.assert_close(L.skew_rkl(student, teacher, mask, alpha=0.0)[0], L.reverse_kl(student, teacher, mask)[0])
    assert L.skew_kl(student, teacher, mask, alpha=1.0)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_taid_t_limits():
    _, _, teacher, mask, _ = make_inputs(dtype=torch.float64)
    student = torch.randn_like(teacher)
    torch.testing.assert_close(L.taid(student, teacher, mask, t=1.0)[0], L.forward_kl(student, teacher, mask)[0])
    assert L.taid(student, teacher, mask, t=0.0)[0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", DIV + ["soft_ce", "ce"])
def test_masked_positions_contribute_nothing(name):
    _, _, teacher, mask, targets = make_inputs(b=3, t=6, v=9)
    student = torch.randn(3, 6, 9)
    dirty_s, dirty_t = student.clone(), teacher.clone()
    dirty_s[~mask] = float("nan")
    dirty_t[~mask] = float("inf")
    kw = {"target_ids": targets} if name == "ce" else {}
    clean = call(name, student, teacher, mask, **kw)[0]
    for chunk in (None, 4):
        s = dirty_s.clone().requires_grad_(True)
        v, n = call(name, s, dirty_t, mask, chunk_tokens=chunk, **kw)
        (g,) = torch.autograd.grad(v, s)
        torch.testing.assert_close(v, clean)
        assert n == int(mask.sum())
        assert torch.all(g[~mask] == 0) and torch.isfinite(g).all()
    # Compare with the selected rows alone.
    sub = call(name, student[mask].unsqueeze(0), teacher[mask].unsqueeze(0), torch.ones(1, int(mask.sum()), dtype=torch.bool),
               **({"target_ids": targets[mask].unsqueeze(0)} if name == "ce" else {}))[0]
    torch.testing.assert_close(clean, sub)


@pytest.mark.parametrize("name", DIV + ["soft_ce"])
def test_padded_vocabulary_with_infinite_logits_gives_no_nan(name):
    _, _, teacher, mask, _ = make_inputs(b=2, t=4, v=10)
    student = torch.randn(2, 4, 10)
    # Last two vocab rows are padding: -inf in the teacher, -inf/+inf in the student.
    teacher[..., -2:] = float("-inf")
    student[..., -2] = float("-inf")
    student[..., -1] = float("inf")
    s = student.clone().requires_grad_(True)
    for chunk in (None, 3):
        v, _ = call(name, s, teacher, mask, chunk_tokens=chunk)
        (g,) = torch.autograd.grad(v, s)
        assert torch.isfinite(v) and torch.isfinite(g).all()
        assert torch.all(g[..., -2:] == 0)
        ref = call(name, student[..., :-2], teacher[..., :-2], mask)[0]
        torch.testing.assert_close(v, ref)
    # Teacher-only padding (the student gives it finite logits): the entry is removed from both
    # distributions, so the value equals the one on the shared finite vocabulary.
    s2 = torch.randn(2, 4, 10, requires_grad=True)
    v, _ = call(name, s2, teacher, mask)
    (g,) = torch.autograd.grad(v, s2)
    assert torch.isfinite(v) and torch.isfinite(g).all() and torch.all(g[..., -2:] == 0)
    torch.testing.assert_close(v, call(name, s2.detach()[..., :-2], teacher[..., :-2], mask)[0])


@pytest.mark.parametrize("name", DIV + ["soft_ce", "ce"])
def test_plain_chunked_fused_agree_forward_and_backward(name):
    hidden, head, teacher, mask, targets = make_inputs(b=3, t=7, v=17, d=8)
    terms = [L.make_logit_term(name, {}, loss_temperature=2.0, scale_by_temperature_squared=True)]
    assert_plain_chunked_fused_agree(terms, hidden, head, teacher, mask, target_ids=targets, loss_temperature=2.0)


@pytest.mark.parametrize("name", DIV)
def test_accumulation_1x8_equals_8x1(name):
    _, _, teacher, mask, _ = make_inputs(b=8, t=4, v=9)
    student = torch.randn(8, 4, 9, requires_grad=True)
    v, n = call(name, student, teacher, mask)
    (g_big,) = torch.autograd.grad(v / n, student)
    total_count = int(mask.sum())
    g_acc = torch.zeros_like(student)
    for i in range(8):
        s = student.detach().clone().requires_grad_(True)
        vi, _ = call(name, s[i : i + 1], teacher[i : i + 1], mask[i : i + 1], chunk_tokens=2)
        (gi,) = torch.autograd.grad(vi / total_count, s)
        g_acc += gi
    torch.testing.assert_close(g_big, g_acc, rtol=1e-5, atol=1e-7)


# Stated tolerance: bf16 logits (8-bit mantissa) shift each logit by up to ~0.4% relative;
# with logits of scale ~2 the per-token value moves by at most ~2e-2 absolute + 3% relative.
BF16_RTOL, BF16_ATOL = 3e-2, 2e-2


@pytest.mark.parametrize("name", DIV + ["soft_ce"])
def test_bf16_inputs_within_tolerance_of_fp32(name):
    _, _, teacher, mask, _ = make_inputs(b=4, t=8, v=32)
    student = torch.randn(4, 8, 32) * 2
    ref, n = call(name, student, teacher, mask)
    s16 = student.bfloat16().requires_grad_(True)
    v16, _ = call(name, s16, teacher.bfloat16(), mask, chunk_tokens=5)
    assert v16.dtype == torch.float32
    assert v16.item() / n == pytest.approx(ref.item() / n, rel=BF16_RTOL, abs=BF16_ATOL)
    (g,) = torch.autograd.grad(v16, s16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("name", DIV)
def test_temperature_and_t_squared(name):
    _, _, teacher, mask, _ = make_inputs()
    student = torch.randn_like(teacher)
    a, _ = call(name, student, teacher, mask, loss_temperature=2.0)
    b, _ = call(name, student / 2.0, teacher / 2.0, mask)
    torch.testing.assert_close(a, b)
    c, _ = call(name, student, teacher, mask, loss_temperature=2.0, scale_by_temperature_squared=True)
    torch.testing.assert_close(c, 4.0 * a)


def test_ce_is_not_tempered_and_ignores_minus_100():
    _, _, _, mask, targets = make_inputs()
    student = torch.randn(2, 5, 11)
    v, n = L.ce(student, None, mask, target_ids=targets, loss_temperature=3.0)
    ref = torch.nn.functional.cross_entropy(student.reshape(-1, 11), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(v, ref)
    assert n == int(mask.sum())


def test_bad_parameter_values_are_clear_errors():
    _, _, teacher, mask, _ = make_inputs()
    with pytest.raises(ValueError, match="beta=1.5"):
        L.jsd(teacher, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="weighting"):
        L.tvd_pp(teacher, teacher, mask, weighting="median")
    with pytest.raises(ValueError, match="mask shape"):
        L.forward_kl(teacher, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="vocab"):
        L.forward_kl(teacher, teacher[..., :5], mask)
