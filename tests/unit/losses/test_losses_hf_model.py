"""The fused path on a real (tiny, random) HF model: last hidden state + lm_head == logits."""

from __future__ import annotations

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
