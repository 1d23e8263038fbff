"""ULD and the matched-token divergences of a cross-tokenizer teacher: hand-computed values, exactness of the
ranked teacher, plain / chunked / fused parity, and aligned rows only."""

import pytest
import torch

from stillroom.losses import forward_kl, make_logit_term, run_fused_logit_terms, run_logit_terms, uld
from stillroom.losses.uld import uld_rows
from stillroom.teachers.signal import CrossTargets, TeacherSignal


def test_uld_rows_by_hand():
    teacher = torch.tensor([[0.5, 0.3]])  # of [0.5, 0.3, 0.2]: top 2 and the tail 0.2
    student = torch.tensor([[0.1, 0.6, 0.3]])  # sorted 0.6, 0.3 | tail 0.1
    assert uld_rows(teacher, torch.tensor([0.2]), student).item() == pytest.approx(0.1 + 0.0 + 0.1)


def _brute_uld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = max(p.shape[-1], q.shape[-1])
    ps = torch.nn.functional.pad(p.sort(-1, descending=True).values, (0, n - p.shape[-1]))
    qs = torch.nn.functional.pad(q.sort(-1, descending=True).values, (0, n - q.shape[-1]))
    return (ps - qs).abs().sum(-1)


@pytest.mark.parametrize("vs,vt", [(7, 11), (11, 7), (9, 9)])
def test_ranked_teacher_with_tail_is_exact(vs, vt):
    g = torch.Generator().manual_seed(vs * vt)
    p = torch.softmax(3 * torch.randn(5, vt, generator=g), -1)
    q = torch.softmax(3 * torch.randn(5, vs, generator=g), -1)
    k = min(vs, vt)
    top = p.topk(k, -1).values
    got = uld_rows(top, 1 - top.sum(-1), q)
    assert torch.allclose(got, _brute_uld(p, q), atol=1e-6)
    # a distribution and any permutation of it (a relabelled vocabulary) are at distance 0
    ranked = q.sort(-1, descending=True).values
    assert torch.allclose(uld_rows(ranked, torch.zeros(5), q[:, torch.randperm(vs, generator=g)]), torch.zeros(5),
                          atol=1e-6)


def _signal(b=2, t=5, vs=9, m_ids=(0, 2, 3, 5, 8), vt=12, seed=0):
    """A cross signal over random teacher logits: matched student ids ``m_ids``, rows (0, 4) and (1, 0) unaligned."""
    g = torch.Generator().manual_seed(seed)
    logits_t = torch.randn(b, t, vt, generator=g) * 2
    matched_teacher = torch.tensor([1, 4, 6, 7, 10])
    aligned = torch.ones(b, t, dtype=torch.bool)
    aligned[0, 4] = aligned[1, 0] = False
    probs = torch.softmax(logits_t, -1)
    k = min(vs, vt)
    top = probs.topk(k, -1).values
    un = probs.index_fill(-1, matched_teacher, 0.0)
    ku = min(vs - len(m_ids), vt - len(m_ids))
    top_u = un.topk(ku, -1).values
    cross = CrossTargets(aligned, torch.tensor(m_ids), logits_t[..., matched_teacher],
                         {"all": (top, 1 - top.sum(-1)), "unmatched": (top_u, un.sum(-1) - top_u.sum(-1))})
    return TeacherSignal(cross=cross), logits_t, matched_teacher


def test_divergences_compare_the_matched_tokens_on_aligned_rows():
    signal, logits_t, matched_teacher = _signal()
    z = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.bool)
    got, count = forward_kl(z, signal, mask)
    ids = signal.cross.matched_student
    want, _ = forward_kl(z[..., ids], logits_t[..., matched_teacher], signal.cross.aligned_bt)
    assert count == 10 and got.item() == pytest.approx(want.item(), rel=1e-6)
    probs = torch.softmax(logits_t, -1)
    q = torch.softmax(z, -1)
    brute = sum(_brute_uld(probs[b, t], q[b, t]) for b in range(2) for t in range(5) if signal.cross.aligned_bt[b, t])
    assert uld(z, signal, mask)[0].item() == pytest.approx(float(brute), rel=1e-5)
    unmatched_s = torch.ones(9, dtype=torch.bool)
    unmatched_s[ids] = False
    unmatched_t = torch.ones(12, dtype=torch.bool)
    unmatched_t[matched_teacher] = False
    brute_u = sum(_brute_uld(probs[b, t][unmatched_t], q[b, t][unmatched_s]) for b in range(2) for t in range(5)
                  if signal.cross.aligned_bt[b, t])
    assert uld(z, signal, mask, support="unmatched")[0].item() == pytest.approx(float(brute_u), rel=1e-5)


def test_plain_chunked_and_fused_agree_with_gradients():
    signal, _, _ = _signal()
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(6, 9, bias=False).double()
    targets = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    terms = [make_logit_term("ce", {}), make_logit_term("forward_kl", {}),
             make_logit_term("uld", {"support": "unmatched"}, key="uldu"), make_logit_term("uld", {})]
    results = []
    for mode in ("plain", "chunked", "fused"):
        hidden.grad = head.weight.grad = None
        if mode == "fused":
            total, parts, _ = run_fused_logit_terms(terms, hidden, head, signal, mask, target_ids=targets, chunk_tokens=3)
        else:
            total, parts, _ = run_logit_terms(terms, head(hidden), signal, mask, target_ids=targets,
                                              chunk_tokens=None if mode == "plain" else 3)
        total.backward()
        results.append((total.item(), [p.item() for p in parts], hidden.grad.clone(), head.weight.grad.clone()))
    for other in results[1:]:
        assert other[0] == pytest.approx(results[0][0], rel=1e-9)
        assert other[1] == pytest.approx(results[0][1], rel=1e-9)
        assert torch.allclose(other[2], results[0][2], atol=1e-10) and torch.allclose(other[3], results[0][3], atol=1e-10)


def test_unaligned_rows_give_no_teacher_gradient():
    signal, _, _ = _signal()
    z = torch.randn(2, 5, 9, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    terms = [make_logit_term("forward_kl", {}), make_logit_term("uld", {})]
    run_logit_terms(terms, z, signal, mask)[0].backward()
    assert z.grad[0, 4].abs().sum() == 0 and z.grad[1, 0].abs().sum() == 0 and z.grad[0, 0].abs().sum() > 0


def test_uld_needs_a_cross_teacher():
    with pytest.raises(ValueError, match="teacher.tokenizer_mode: cross"):
        uld(torch.randn(1, 2, 5), torch.randn(1, 2, 5), torch.ones(1, 2, dtype=torch.bool))
