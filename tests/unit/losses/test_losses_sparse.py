"""Top-k teacher signals: the K + 1 bin estimator."""

from __future__ import annotations

import pytest
import torch

import stillroom.losses as L
from losses_helpers import make_inputs, topk_signal
from stillroom.losses.sparse import student_bins

SPARSE = [n for n in L.DIVERGENCES if L.get_term(n).sparse_ok]


def call(name, s, t, m, **kw):
    return L.get_term(name).fn(s, t, m, **kw)


def test_required_sparse_terms_are_supported():
    assert {"forward_kl", "reverse_kl", "jsd", "tvd"} <= set(SPARSE)


@pytest.mark.parametrize("name", SPARSE + ["soft_ce"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equals_v_matches_dense(name, temperature):
    _, _, teacher, mask, _ = make_inputs(b=3, t=6, v=24)
    student = torch.randn(3, 6, 24, requires_grad=True)
    dense, n = call(name, student, teacher, mask, loss_temperature=temperature)
    (g_dense,) = torch.autograd.grad(dense, student)
    signal = topk_signal(teacher, 24, temperature)
    # (fp32 rounding leaves tail_logmass ~ -15 instead of -inf here; the empty tail bin is handled)
    for chunk in (None, 5):
        sp, n2 = call(name, student, signal, mask, loss_temperature=temperature, chunk_tokens=chunk)
        (g_sp,) = torch.autograd.grad(sp, student)
        assert n2 == n
        assert abs(sp.item() - dense.item()) / n <= 1e-6
        torch.testing.assert_close(g_sp, g_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_is_between_zero_and_dense(name, k):
    _, _, teacher, mask, _ = make_inputs(b=3, t=6, v=24, seed=k)
    student = torch.randn(3, 6, 24) * 2
    dense, _ = call(name, student, teacher, mask)
    sp, _ = call(name, student, topk_signal(teacher, k), mask)
    assert 0.0 <= sp.item() <= dense.item() + 1e-5
    # Equal distributions give zero on the bins too.
    same, _ = call(name, teacher.clone(), topk_signal(teacher, k), mask)
    assert abs(same.item()) < 1e-5


def test_student_tail_bin_is_exact_and_gradient_finite():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    ids = torch.tensor([[0, 1, 2]] * 4)
    bins = student_bins(logp, ids)
    assert bins.shape == (4, 4)
    torch.testing.assert_close(bins.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(bins[:, 3], torch.logsumexp(logp[:, 3:], -1))
    all_ids = torch.arange(9).repeat(4, 1)
    full = student_bins(logp, all_ids)
    assert torch.isneginf(full[:, -1]).all()
    full[:, :-1].sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_all_finite_tail_fast_path_equals_the_checked_path_with_gradients():
    logits = torch.randn(6, 11, dtype=torch.float64)
    ids = torch.stack([torch.randperm(11)[:4] for _ in range(6)])
    results = []
    for fast in (False, True):
        leaf = logits.clone().requires_grad_(True)
        bins = student_bins(torch.log_softmax(leaf, -1), ids, all_finite=fast)
        (bins * torch.linspace(0.1, 1.0, 5, dtype=torch.float64)).sum().backward()
        results.append((bins.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-12)
    # k = V leaves nothing outside: the fast path is not taken, the tail is -inf.
    assert torch.isneginf(student_bins(torch.log_softmax(logits, -1), torch.arange(11).repeat(6, 1),
                                       all_finite=True)[:, -1]).all()


def test_top_k_with_padded_student_vocab():
    _, _, teacher, mask, _ = make_inputs(b=2, t=3, v=12)
    student = torch.randn(2, 3, 12)
    student[..., -1] = float("-inf")  # padding row the teacher never ranks
    teacher[..., -1] = float("-inf")
    s = student.clone().requires_grad_(True)
    v, _ = L.forward_kl(s, topk_signal(teacher, 11), mask, chunk_tokens=2)
    (g,) = torch.autograd.grad(v, s)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    dense, _ = L.forward_kl(student, teacher, mask)
    assert abs(v.item() - dense.item()) < 1e-5


def test_temperature_mismatch_and_taid_are_clear_errors():
    _, _, teacher, mask, _ = make_inputs()
    signal = topk_signal(teacher, 4, temperature=1.0)
    with pytest.raises(ValueError, match="cannot be re-tempered"):
        L.forward_kl(teacher, signal, mask, loss_temperature=2.0)
    with pytest.raises(ValueError, match="dense teacher"):
        L.taid(teacher, signal, mask)
