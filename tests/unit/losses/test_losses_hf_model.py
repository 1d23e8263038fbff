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
