"""The fused path on a real (tiny, random) HF model: last hidden state + lm_head == logits."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import stillroom.losses as L
from stillroom.config.schema import LossConfig, LossTerm


def test_fused_mix_on_tiny_llama_matches_plain_logits():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    student, teacher = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
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
