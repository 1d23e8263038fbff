"""The closed-form chunk (stillroom.losses.closed_form) against the plain autograd path: values and gradients.

Every term with a closed form, alone and mixed, at temperature 1 and 2, with per-token weights, with counted rows
that are consecutive, that fill 90% of their range (slices with a keep mask) and that are sparse (gathers), from
logits (chunked path) and from the last hidden state (fused path); a top-k teacher through the bins; and the
fallback to the autograd kernels for a chunk with a non-finite logit.
"""

from __future__ import annotations

import pytest
import torch

import stillroom.losses as L
from stillroom.config.schema import LossConfig, LossTerm
from stillroom.losses import closed_form
from stillroom.teachers.signal import TeacherSignal, tail_logmass

B, T, V, D = 3, 7, 40, 12
MIXES = {
    "ce": [LossTerm(name="ce")],
    "forward_kl": [LossTerm(name="forward_kl")],
    "reverse_kl": [LossTerm(name="reverse_kl")],
    "soft_ce": [LossTerm(name="soft_ce")],
    "jsd": [LossTerm(name="jsd", params={"beta": 0.3})],
    "jsd_ends": [LossTerm(name="jsd", params={"beta": 0.0}), LossTerm(name="jsd", params={"beta": 1.0}, weight=0.5)],
    "fkl+ce": [LossTerm(name="forward_kl", weight=0.7), LossTerm(name="ce", weight=0.3)],
}


def _mask(kind: str) -> torch.Tensor:
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "but_last":  # text: every position but each sequence's last -> spans with a keep mask
        m = torch.ones(B, T, dtype=torch.bool)
        m[:, -1] = False
        return m
    g = torch.Generator().manual_seed(3)
    return torch.rand(B, T, generator=g) < 0.5  # sparse -> gathered rows


class Count:
    """Counts chunks the closed forms handled (not None) and those they handed back."""

    def __init__(self, monkeypatch):
        self.closed = self.back = 0
        real = closed_form.run_chunk

        def run(*a, **k):
            out = real(*a, **k)
            if out is None:
                self.back += 1
            else:
                self.closed += 1
            return out

        monkeypatch.setattr(closed_form, "run_chunk", run)


def _run(terms, logits, teacher, targets, mask, *, chunk, temperature=1.0, weights=None, t2=False):
    leaf = logits.clone().requires_grad_(True)
    mix = L.LossMix(LossConfig(terms=terms, chunk_tokens=4, loss_temperature=temperature,
                               scale_by_temperature_squared=t2))
    mix.chunk_tokens = chunk
    res = mix(L.StudentOutput(logits_btv=leaf), teacher, targets, mask, weight_bt=weights)
    res.total.backward()
    return res.total.detach(), leaf.grad, {k: float(v) for k, v in res.parts.items()}


@pytest.mark.parametrize("mix_name", sorted(MIXES))
@pytest.mark.parametrize("mask_kind", ["all", "but_last", "sparse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_chunks_match_the_plain_path(mix_name, mask_kind, temperature, monkeypatch):
    torch.manual_seed(0)
    logits, t_logits = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    targets = torch.randint(0, V, (B, T))
    targets[0, 2] = -100
    mask = _mask(mask_kind)
    weights = torch.rand(B, T) + 0.5
    plain = _run(MIXES[mix_name], logits, t_logits, targets, mask, chunk=None, temperature=temperature,
                 weights=weights, t2=True)
    count = Count(monkeypatch)
    closed = _run(MIXES[mix_name], logits, t_logits, targets, mask, chunk=4, temperature=temperature,
                  weights=weights, t2=True)
    assert count.closed > 0 and count.back == 0
    torch.testing.assert_close(closed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed[1], plain[1], rtol=1e-4, atol=1e-6)
    assert closed[2] == pytest.approx(plain[2], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "soft_ce"])
@pytest.mark.parametrize("k", [5, V])
def test_top_k_teacher_bins_spread_onto_the_vocabulary_match_the_plain_path(name, k, monkeypatch):
    """A top-k teacher: the term's own kernel on the K + 1 bins, its bin gradient spread in closed form; k = V
    (an empty tail bin) included."""
    torch.manual_seed(1)
    logits = torch.randn(B, T, V) * 2
    lp = torch.log_softmax(torch.randn(B, T, V) * 2, -1)
    top_lp, top_ids = lp.topk(k, -1)
    teacher = TeacherSignal(topk_ids_btk=top_ids, topk_logprobs_btk=top_lp, tail_logmass_bt=tail_logmass(top_lp))
    targets = torch.randint(0, V, (B, T))
    terms = [LossTerm(name=name), LossTerm(name="ce", weight=0.5)]
    plain = _run(terms, logits, teacher, targets, _mask("but_last"), chunk=None)
    count = Count(monkeypatch)
    closed = _run(terms, logits, teacher, targets, _mask("but_last"), chunk=4)
    assert count.closed > 0 and count.back == 0
    torch.testing.assert_close(closed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed[1], plain[1], rtol=1e-4, atol=1e-6)


def test_fused_closed_path_matches_plain_logits_for_head_weight_hidden_and_bias():
    torch.manual_seed(2)
    hidden = torch.randn(B, T, D)
    head = torch.nn.Linear(D, V, bias=True)
    t_logits = torch.randn(B, T, V) * 2
    targets = torch.randint(0, V, (B, T))
    mask = _mask("but_last")
    cfg = LossConfig(terms=MIXES["fkl+ce"], chunk_tokens=4)
    grads = []
    for fused in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_(True)
        mix = L.LossMix(cfg)
        out = L.StudentOutput(hidden_btd=h, head=head) if fused else L.StudentOutput(logits_btv=head(h))
        if not fused:
            mix.chunk_tokens = None
        res = mix(out, t_logits, targets, mask)
        res.total.backward()
        grads.append((res.total.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_chunk_with_an_infinite_logit_goes_back_to_the_autograd_kernels(monkeypatch):
    """A banned token (-inf in the student's and the teacher's logits) is excluded from both distributions by
    the kernels; the closed forms hand such a chunk back, and the result equals the plain path's."""
    torch.manual_seed(4)
    logits, t_logits = torch.randn(B, T, V), torch.randn(B, T, V)
    logits[0, 1, 7] = t_logits[0, 1, 7] = float("-inf")
    targets = torch.randint(0, V, (B, T))
    terms = MIXES["fkl+ce"]
    plain = _run(terms, logits, t_logits, targets, _mask("all"), chunk=None)
    count = Count(monkeypatch)
    closed = _run(terms, logits, t_logits, targets, _mask("all"), chunk=4)
    assert count.back == 1 and count.closed > 0
    torch.testing.assert_close(closed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed[1], plain[1], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(closed[1]).all()


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_where_both_distributions_underflow_and_where_they_are_equal(beta, monkeypatch):
    """JSD's closed form takes log m from ``q + beta / (1 - beta) p`` unclamped and redoes a chunk's sums with
    a clamp only when an entry where p and q both underflow made them NaN; rows where p = q give 0. Both
    match the plain path, with finite gradients."""
    torch.manual_seed(7)
    logits, t_logits = torch.randn(B, T, V) * 3, torch.randn(B, T, V) * 3
    logits[:, :3, :5] = t_logits[:, :3, :5] = -300.0  # exp underflows to 0 in fp32 for both
    logits[1, 4], t_logits[1, 4] = t_logits[1, 4] * 0 + 1.5, t_logits[1, 4] * 0 + 1.5  # a uniform row in both
    t_logits[2] = logits[2]  # p = q on a whole sequence
    targets = torch.randint(0, V, (B, T))
    terms = [LossTerm(name="jsd", params={"beta": beta})]
    plain = _run(terms, logits, t_logits, targets, _mask("all"), chunk=None)
    count = Count(monkeypatch)
    closed = _run(terms, logits, t_logits, targets, _mask("all"), chunk=4)
    assert count.closed > 0 and count.back == 0
    assert torch.isfinite(closed[1]).all()
    torch.testing.assert_close(closed[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(closed[1], plain[1], rtol=1e-4, atol=1e-6)
    assert closed[1][2].abs().max() < 1e-6  # p = q: no gradient


def test_head_grad_flushes_bf16_partial_sums_into_fp32():
    """bf16 chunk products are summed in bf16 at most ``flush_every`` times before joining the fp32 total: the
    result stays within a few bf16 roundings of the fp32 product."""
    torch.manual_seed(5)
    g, x = torch.randn(64, 50), torch.randn(64, 9)
    acc = closed_form.HeadGrad(torch.bfloat16, flush_every=3)
    for i in range(0, 64, 8):
        acc.add(g[i : i + 8].bfloat16(), x[i : i + 8].bfloat16())
    got, want = acc.scaled(torch.tensor(2.0), torch.empty(50, 9)), 2 * g.t() @ x
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.1)


def test_chunk_rows_shrink_with_the_vocabulary_so_one_buffer_stays_under_the_budget():
    from stillroom.losses.engine import CHUNK_BYTES, chunk_rows

    assert chunk_rows(256, 49_152) == 256  # SmolLM2: the default is untouched
    assert chunk_rows(256, 256_000) == 64  # Gemma-class: 64 rows of 1 MB
    assert chunk_rows(7, 100) == 7
    for vocab in (32_000, 151_936, 256_000, 10**7):
        rows = chunk_rows(4096, vocab)
        assert rows % 16 == 0 and rows >= 16
        assert rows == 16 or rows * vocab * 4 <= CHUNK_BYTES


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_kind", ["dense", "top-k"])
def test_closed_forms_on_cuda_match_the_plain_path_and_stay_on_the_device(teacher_kind, monkeypatch):
    """On CUDA the workspace, the closed forms and the bins live on the logits' device; the fused closed path
    equals the plain path there (fp32, then under bf16 autocast where the head's matmuls run in bf16)."""
    dev = torch.device("cuda")
    torch.manual_seed(6)
    hidden = torch.randn(B, T, D, device=dev)
    head = torch.nn.Linear(D, V, bias=False).to(dev)
    lp = torch.log_softmax(torch.randn(B, T, V, device=dev) * 2, -1)
    top_lp, top_ids = lp.topk(5, -1)
    teacher = lp if teacher_kind == "dense" else TeacherSignal(
        topk_ids_btk=top_ids, topk_logprobs_btk=top_lp, tail_logmass_bt=tail_logmass(top_lp))
    targets = torch.randint(0, V, (B, T), device=dev)
    mask = _mask("but_last").to(dev)
    for autocast in (False, True):
        grads = []
        count = Count(monkeypatch)
        for fused in (False, True):
            head.zero_grad()
            h = hidden.clone().requires_grad_(True)
            mix = L.LossMix(LossConfig(terms=MIXES["fkl+ce"], chunk_tokens=4))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = L.StudentOutput(hidden_btd=h, head=L.OutputHead(head.weight, None, torch.bfloat16 if autocast
                                                                        else None)) if fused else \
                    L.StudentOutput(logits_btv=head(h))
                if not fused:
                    mix.chunk_tokens = None
                res = mix(out, teacher, targets, mask)
            res.total.backward()
            grads.append((res.total.detach().float(), h.grad, head.weight.grad.clone()))
        assert count.closed > 0 and count.back == 0
        tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
        for a, b in zip(grads[1], grads[0]):
            assert a.device.type == "cuda"
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("teacher_kind", ["dense", "top-k"])
def test_without_grad_the_closed_forms_give_the_values_alone(teacher_kind, monkeypatch):
    """Evaluation (no_grad): the same values as the plain path, and no gradient buffer is written."""
    torch.manual_seed(7)
    logits = torch.randn(B, T, V) * 2
    lp = torch.log_softmax(torch.randn(B, T, V) * 2, -1)
    top_lp, top_ids = lp.topk(5, -1)
    teacher = lp if teacher_kind == "dense" else TeacherSignal(
        topk_ids_btk=top_ids, topk_logprobs_btk=top_lp, tail_logmass_bt=tail_logmass(top_lp))
    targets = torch.randint(0, V, (B, T))
    totals = []
    count = Count(monkeypatch)
    closed_form.Workspace._last = None  # a fresh workspace: a written gradient would leave its buffer behind
    for chunk in (None, 4):
        mix = L.LossMix(LossConfig(terms=MIXES["fkl+ce"], chunk_tokens=4))
        mix.chunk_tokens = chunk
        with torch.no_grad():
            totals.append(mix(L.StudentOutput(logits_btv=logits), teacher, targets, _mask("but_last")).total)
    assert count.closed > 0 and count.back == 0
    assert ("grad", torch.float32) not in closed_form.Workspace._last._buffers
    torch.testing.assert_close(totals[1], totals[0], rtol=1e-5, atol=1e-5)


def test_recycled_storage_is_reused_only_once_nothing_holds_it():
    """A recycled tensor is handed out again (same memory) once the tensor given before is gone, and never while
    it is alive: a graph still holding last call's partial sum gets fresh memory, not an overwritten buffer."""
    ws = closed_form.Workspace(4, 10, torch.device("cpu"))
    first = ws.recycled("part", (10, 3), torch.bfloat16).fill_(1)
    held = ws.recycled("part", (10, 3), torch.bfloat16)
    assert held.data_ptr() != first.data_ptr() and first.eq(1).all()  # `first` is alive: not overwritten
    ptr = held.data_ptr()
    del first, held
    again = ws.recycled("part", (10, 3), torch.bfloat16)
    assert again.data_ptr() == ptr  # the last one kept is free: reused
    assert ws.recycled("part", (5, 3), torch.bfloat16).data_ptr() != ptr  # another size: fresh


def test_fused_head_gradient_reuses_its_partial_sum_across_steps_and_matches_the_plain_path():
    """Two steps of the fused path under bf16 autocast: the second step's head gradient equals the plain path's
    (the recycled partial sum is overwritten, not added to), and it lives at the first step's address."""
    torch.manual_seed(8)
    head = torch.nn.Linear(D, V, bias=False)
    targets = torch.randint(0, V, (B, T))
    ptrs, grads, grad_ptrs = [], [], []
    for step in range(2):
        hidden = torch.randn(B, T, D)
        teacher = torch.log_softmax(torch.randn(B, T, V) * 2, -1)
        for fused in (True, False):
            head.zero_grad(set_to_none=True)
            h = hidden.clone().requires_grad_(True)
            mix = L.LossMix(LossConfig(terms=MIXES["fkl+ce"], chunk_tokens=4, fused=fused))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = L.StudentOutput(hidden_btd=h, head=L.OutputHead(head.weight, None, torch.bfloat16)) if fused \
                    else L.StudentOutput(logits_btv=head(h))
                res = mix(out, teacher, targets, _mask("all"))
            res.total.backward()
            grads.append(head.weight.grad.clone())
            del res, out
            if fused:
                ptrs.append(closed_form.Workspace._last._kept[("head_grad_part", torch.bfloat16)].data_ptr())
                grad_ptrs.append(head.weight.grad.data_ptr())
        torch.testing.assert_close(grads[-2], grads[-1], rtol=3e-2, atol=3e-3)
    assert ptrs[0] == ptrs[1]
    assert grad_ptrs[0] == grad_ptrs[1]  # the weight's .grad itself: recycled once zero_grad let it go
    # A .grad someone still holds is never overwritten: the next backward gets fresh memory.
    held, before = head.weight.grad, head.weight.grad.clone()
    head.zero_grad(set_to_none=True)
    h = torch.randn(B, T, D, requires_grad=True)
    mix = L.LossMix(LossConfig(terms=MIXES["fkl+ce"], chunk_tokens=4))
    mix(L.StudentOutput(hidden_btd=h, head=L.OutputHead(head.weight, None, None)), teacher, targets,
        _mask("all")).total.backward()
    assert head.weight.grad.data_ptr() != held.data_ptr() and torch.equal(held, before)


def test_all_finite_reads_bf16_and_fp32_by_their_sum_and_fp16_entry_by_entry():
    """The finiteness check behind the fallback: a bf16 or fp32 chunk by its (fp32-accumulated) sum, without a
    converted copy; fp16 entry by entry, because 2000 finite entries of 60000 sum past fp16's range."""
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = torch.full((4, 500), 60000.0 if dtype == torch.float16 else 1e30, dtype=dtype)
        assert closed_form.all_finite(x)
        for bad in (float("inf"), float("-inf"), float("nan")):
            y = x.clone()
            y[2, 7] = bad
            assert not closed_form.all_finite(y), (dtype, bad)
