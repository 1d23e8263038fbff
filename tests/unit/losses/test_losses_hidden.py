"""Hidden-state and attention terms, layer maps."""

from __future__ import annotations

import pytest
import torch

import stillroom.losses as L
from stillroom.teachers.signal import TeacherSignal


def test_uniform_layer_maps():
    assert L.uniform_layer_map(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert L.uniform_layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert L.uniform_layer_map(10, 30)[-1] == (10, 30)
    assert L.uniform_layer_map(2, 4, include_embeddings=True) == [(0, 0), (1, 2), (2, 4)]
    assert L.uniform_attention_map(2, 4) == [(0, 1), (1, 3)]
    assert L.resolve_layer_map("x", [[1, 3]], 2, 4) == [(1, 3)]
    assert L.resolve_layer_map("x", "last", 2, 4) == [(2, 4)]
    with pytest.raises(ValueError, match="out of range"):
        L.resolve_layer_map("x", [[3, 1]], 2, 4)
    with pytest.raises(ValueError, match="valid"):
        L.resolve_layer_map("x", "every", 2, 4)


def _states(seed, b=2, t=4, h=3, layers=(1, 2)):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randn(b, t, h, generator=g) for i in layers}


def test_squarehead_hand_value_and_mask():
    hs = {1: torch.tensor([[[1.0, 2.0], [9.0, 9.0]]])}
    ht = {1: torch.tensor([[[0.0, 2.0], [5.0, 5.0]]])}
    mask = torch.tensor([[True, False]])
    value, count = L.squarehead(hs, TeacherSignal(hidden_states=ht), mask, eps=0.0)
    # token 0: mean_d (1-0)^2, (2-2)^2 = 0.5 ; norm = mean(0^2, 2^2) = 2 -> 0.25
    assert count == 1
    assert value.item() == pytest.approx(0.25)
    value, _ = L.squarehead(hs, ht, mask)  # default eps = 2^-7
    assert value.item() == pytest.approx(0.5 / (2 + 2**-7))


def test_squarehead_zero_iff_equal_and_gradient():
    ht = _states(0)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert L.squarehead({k: v.clone() for k, v in ht.items()}, ht, mask)[0].item() == 0.0
    hs = {k: v.clone().requires_grad_(True) for k, v in _states(1).items()}
    val, _ = L.squarehead(hs, ht, mask)
    assert val.item() > 0
    val.backward()
    assert all(torch.isfinite(h.grad).all() for h in hs.values())


def test_hidden_mse_with_projection_and_cosine():
    hs, ht = _states(0, h=3), _states(1, h=5)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    proj = {1: torch.nn.Linear(3, 5, bias=False), 2: torch.nn.Linear(3, 5, bias=False)}
    value, count = L.hidden_mse(hs, ht, mask, projections=proj)
    want = sum(((proj[i](hs[i]) - ht[i]).pow(2).mean(-1) * mask).sum() for i in (1, 2))
    torch.testing.assert_close(value, want)
    assert count == 6
    value.backward()
    assert proj[1].weight.grad is not None
    cos, _ = L.hidden_cosine(hs, ht, mask, projections=proj)
    want = sum(((1 - torch.cosine_similarity(proj[i](hs[i]), ht[i], dim=-1)) * mask).sum() for i in (1, 2))
    torch.testing.assert_close(cos, want)
    with pytest.raises(ValueError, match="projection"):
        L.hidden_mse(hs, ht, mask)
    with pytest.raises(ValueError, match="did not return"):
        L.hidden_mse(hs, ht, mask, layer_map=[(3, 1)])


def test_attention_mse_hand_value_and_head_mismatch():
    b, h, t = 1, 2, 3
    a_s = torch.softmax(torch.randn(b, h, t, t), -1)
    a_t = torch.softmax(torch.randn(b, h, t, t), -1)
    mask = torch.tensor([[True, False, True]])
    value, count = L.attention_mse({0: a_s}, TeacherSignal(hidden_states={}, attentions={0: a_t}, logits_btv=torch.zeros(1, 3, 2)),
                                   mask)
    want = sum((a_s[0, :, q] - a_t[0, :, q]).pow(2).sum(-1).mean() for q in (0, 2))
    torch.testing.assert_close(value, want)
    assert count == 2
    # Different head counts: compare head means.
    a_t4 = torch.softmax(torch.randn(b, 4, t, t), -1)
    v2, _ = L.attention_mse({0: a_s}, {0: a_t4}, mask)
    want2 = sum((a_s.mean(1)[0, q] - a_t4.mean(1)[0, q]).pow(2).sum() for q in (0, 2))
    torch.testing.assert_close(v2, want2)
    assert L.attention_mse({0: a_s}, {0: a_s.clone()}, mask)[0].item() == 0.0


def test_hidden_terms_empty_mask_stay_in_graph():
    hs = {k: v.requires_grad_(True) for k, v in _states(0).items()}
    mask = torch.zeros(2, 4, dtype=torch.bool)
    value, count = L.squarehead(hs, _states(1), mask)
    assert count == 0 and value.item() == 0.0
    value.backward()
