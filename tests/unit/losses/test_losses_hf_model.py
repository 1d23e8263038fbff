"""The fused path on a real (tiny, random) HF model: last hidden state + lm_head == logits."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

import stillroom.losses as L
from stillroom.config.schema import LossConfig, LossTerm


def test_fused_mix_on_tiny_llama_matches_plain_logits():
    config = dict(layers=2, max_positions=64, bos=1, eos=2, pad=None)  # LlamaConfig's special ids
    student = tiny_llama(97, seed=0, **config)
    teacher = tiny_llama(97, seed=None, **config)  # the next weights from the same seed
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    mask = targets != -100
    with torch.no_grad():
        t_logits = teacher(ids).logits
    loss_cfg = LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce", weight=0.5)], chunk_tokens=7)
    mix = L.LossMix(loss_cfg)

    out = student(ids, output_hidden_states=True)
    plain = mix(L.StudentOutput(logits_btv=out.logits), t_logits, targets, mask)
    plain.total.backward()
    g_plain = student.lm_head.weight.grad.clone()
    student.zero_grad()

    hidden = student.model(ids).last_hidden_state  # after the final norm
    fused = mix(L.StudentOutput(hidden_btd=hidden, head=student.lm_head), t_logits, targets, mask)
    fused.total.backward()
    torch.testing.assert_close(fused.total, plain.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.lm_head.weight.grad, g_plain, rtol=1e-4, atol=1e-6)
    assert fused.parts.keys() == plain.parts.keys() == {"forward_kl", "ce"}


def test_fused_under_bf16_autocast_matches_the_plain_path_and_runs_the_head_in_bf16():
    """The plain path's head runs in bf16 under autocast; the fused path must do the same (same values, same
    gradients) rather than an fp32 head matmul, which costs several times more on bf16 hardware."""
    from stillroom.data.batch import Batch
    from stillroom.domains.lm.forward import StudentForward

    student = tiny_llama(97, seed=0, layers=2, max_positions=64, bos=1, eos=2, pad=None)
    teacher_logits = torch.randn(2, 12, 97)
    ids = torch.randint(0, 97, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=targets, uids=["a", "b"],
                  n_bytes=torch.zeros(2, dtype=torch.long))
    mix = L.LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce")], chunk_tokens=7))
    results, grads = {}, {}
    for fused in (False, True):
        forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=97)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(batch)
        if fused:
            assert out["hidden"].dtype == torch.float32 and out["head"].matmul_dtype == torch.bfloat16
        else:
            assert out["logits"].dtype == torch.bfloat16
        res = mix(L.StudentOutput(logits_btv=out.get("logits"), hidden_btd=out.get("hidden"), head=out.get("head")),
                  teacher_logits, targets, batch.loss_mask)
        res.total.backward()
        results[fused] = res.total.detach()
        grads[fused] = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-4)
    for name, g in grads[False].items():
        # The head's (tied) weight gradient: the plain path rounds the whole [V, D] product to bf16 once, the
        # fused path adds per-chunk bf16 products in fp32; they agree to bf16 rounding. Everything below the
        # head sees the same bf16 hidden-state gradient.
        tol = 2.0 ** -7 * float(g.abs().max()) if name == "model.embed_tokens.weight" else 1e-6
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=tol, msg=name)
    # Without autocast the head keeps the weight's dtype.
    assert StudentForward(student, fused=True, hidden_layers=[], vocab=97)(batch)["head"].matmul_dtype is None


def test_chunked_path_over_consecutive_rows_uses_slices_and_matches_plain():
    """Every position counted: the chunks are slices of the flat axis (views, no gathers); values and gradients
    equal the plain path's, for a dense and for a top-k teacher."""
    from stillroom.teachers.signal import TeacherSignal, tail_logmass

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 31, dtype=torch.float64)
    t_logits = torch.randn(2, 9, 31, dtype=torch.float64)
    targets = torch.randint(0, 31, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    lp = torch.log_softmax(t_logits, -1)
    top_lp, top_ids = lp.topk(5, -1)
    topk = TeacherSignal(topk_ids_btk=top_ids, topk_logprobs_btk=top_lp, tail_logmass_bt=tail_logmass(top_lp))
    for teacher in (t_logits, topk):
        results = []
        for chunk in (None, 4):
            leaf = logits.clone().requires_grad_(True)
            mix = L.LossMix(LossConfig(terms=[LossTerm(name="forward_kl"), LossTerm(name="ce")], chunk_tokens=4))
            mix.chunk_tokens = chunk  # None: the plain reference path
            res = mix(L.StudentOutput(logits_btv=leaf), teacher, targets, mask)
            res.total.backward()
            results.append((res.total.detach(), leaf.grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)


def _tied_step(student, batches, *, handoff: bool, autocast: bool = False):
    """Gradients of every parameter after the fused KD loss over ``batches`` (accumulated), through
    StudentForward with the tied-head handoff on or off."""
    from stillroom.domains.lm import forward as F

    forward = F.StudentForward(student, fused=True, hidden_layers=[], vocab=97)
    if not handoff:
        forward.tied = None
    mix = L.LossMix(LossConfig(terms=[LossTerm(name="jsd", params={"beta": 0.5}), LossTerm(name="ce")],
                               chunk_tokens=7))
    student.zero_grad(set_to_none=True)
    for batch, t_logits in batches:
        kind = t_logits.device.type
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast):
            out = forward(batch)
        assert (out["head"].tied is not None) == handoff
        res = mix(L.StudentOutput(hidden_btd=out["hidden"], head=out["head"]), t_logits, batch.target_ids,
                  batch.loss_mask)
        res.total.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_tied_embedding_takes_the_fused_head_gradient_and_matches_autograd_s_sum(device, monkeypatch):
    """With the output head tied to the input embedding, the fused loss hands its ``[V, D]`` weight gradient to
    the embedding's backward, which adds its rows (not the padding id's) and returns the one gradient: every
    parameter's gradient equals autograd's sum of the two, over two accumulated micro-batches, in fp32 and
    under bf16 autocast; autograd never sums two ``[V, D]`` gradients for the weight."""
    from stillroom.data.batch import Batch
    from stillroom.domains.lm import forward as F

    student = tiny_llama(97, seed=0, layers=2, max_positions=64, bos=1, eos=2, pad=3).to(device)
    assert F.tied_embedding(student, student.lm_head) is student.model.embed_tokens
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 97, (2, 12), generator=g)
        ids[0, :3] = 3  # padding-id tokens: their rows add nothing to the embedding's gradient
        targets = torch.roll(ids, -1, 1)
        targets[:, -1] = -100
        batch = Batch(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                      target_ids=targets.to(device), uids=["a", "b"], n_bytes=torch.zeros(2, dtype=torch.long))
        batches.append((batch, (torch.randn(2, 12, 97, generator=g) * 2).to(device)))
    calls = []
    real = F._TiedEmbedding.backward
    monkeypatch.setattr(F._TiedEmbedding, "backward",
                        staticmethod(lambda ctx, grad: calls.append(ctx.sink.grad is not None) or real(ctx, grad)))
    for autocast in (False, True):
        calls.clear()
        want = _tied_step(student, batches, handoff=False, autocast=autocast)
        got = _tied_step(student, batches, handoff=True, autocast=autocast)
        assert calls == [True, True]  # each micro-batch: the loss's gradient was waiting for the embedding
        for name, grad in want.items():
            assert got[name].device.type == device
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_an_untied_or_sliced_head_keeps_autograd_s_own_embedding_gradient():
    from stillroom.domains.lm import forward as F

    untied = tiny_llama(97, seed=0, layers=1, tie=False)
    assert F.tied_embedding(untied, untied.lm_head) is None
    tied = tiny_llama(97, seed=0, layers=1)
    assert F.StudentForward(tied, fused=True, hidden_layers=[], vocab=97).tied is not None
    ids = torch.randint(0, 97, (1, 5))
    from stillroom.data.batch import Batch

    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=ids, uids=["a"],
                  n_bytes=torch.zeros(1, dtype=torch.long))
    sliced = F.StudentForward(tied, fused=True, hidden_layers=[], vocab=90)(batch)  # a shared vocabulary of 90
    assert sliced["head"].tied is None and sliced["head"].weight.shape[0] == 90
    with torch.no_grad():
        assert F.StudentForward(tied, fused=True, hidden_layers=[], vocab=97)(batch)["head"].tied is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("terms", [["forward_kl", "ce"], ["jsd"], ["tvd", "ce"]])
def test_a_teacher_in_head_mode_gives_the_loss_what_its_logits_give(terms, device):
    """The online teacher in head mode hands over its last hidden state and head (TeacherHidden); the loss makes
    each chunk's teacher logits from them. Values and student gradients equal those from the teacher's whole
    logits, through the closed forms (forward KL, JSD, CE) and the autograd kernels (TVD), fp32 and bf16."""
    from stillroom.data.batch import Batch
    from stillroom.domains.lm.forward import StudentForward
    from stillroom.domains.lm.head_teacher import head_mode_teacher
    from stillroom.teachers.signal import OnlineTeacher, TeacherHidden

    student = tiny_llama(97, seed=0, layers=2, max_positions=64, bos=1, eos=2, pad=None).to(device)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=targets, uids=["a", "b"],
                  n_bytes=torch.zeros(2, dtype=torch.long))
    mix = L.LossMix(LossConfig(terms=[LossTerm(name=t) for t in terms], chunk_tokens=7))
    for dtype in (torch.float32, torch.bfloat16):
        teacher_model = tiny_llama(97, seed=3, layers=2, hidden=48, max_positions=64, bos=1, eos=2, pad=None)
        online = OnlineTeacher(teacher_model.to(device, dtype), vocab_size=97, output_device=device)
        headed = head_mode_teacher(online, mix)
        assert headed is not online and headed.head is not None
        results = []
        for source in (online, headed):
            signal = source.signal(batch)
            assert isinstance(signal, TeacherHidden) == (source is headed)
            if source is headed:
                assert signal.hidden_btd.device.type == signal.weight.device.type == device
            out = StudentForward(student, fused=True, hidden_layers=[], vocab=97)(batch)
            res = mix(L.StudentOutput(hidden_btd=out["hidden"], head=out["head"]), signal, targets, batch.loss_mask)
            student.zero_grad(set_to_none=True)
            res.total.backward()
            results.append((res.total.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_head_mode_is_left_out_where_the_teacher_must_hand_over_more_than_logits():
    from stillroom.domains.lm.head_teacher import head_mode_teacher
    from stillroom.teachers.signal import OnlineTeacher

    model = tiny_llama(97, seed=3, layers=2)
    logits_only = L.LossMix(LossConfig(terms=[LossTerm(name="forward_kl")]))
    assert head_mode_teacher(OnlineTeacher(model, vocab_size=97), logits_only).head is not None
    assert head_mode_teacher(OnlineTeacher(model, vocab_size=97, hidden_layers=[1]), logits_only).head is None
    assert head_mode_teacher(OnlineTeacher(model, vocab_size=97, attentions=True), logits_only).head is None
    elsewhere = OnlineTeacher(model, vocab_size=97, output_device="meta")  # the student lives on another device
    assert head_mode_teacher(elsewhere, logits_only).head is None
    model.config.final_logit_softcapping = 30.0  # logits are not head(hidden): the teacher keeps its logits
    assert head_mode_teacher(OnlineTeacher(model, vocab_size=97), logits_only).head is None
