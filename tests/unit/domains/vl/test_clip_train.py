"""The contrastive loss by hand, soft targets over repeated captions, and the cached text features' parity."""

import math

import pytest
import torch
import torch.nn.functional as F
from clip_helpers import tiny_clip_config, tiny_text_folder

from stillroom.domains.vl.clip_data import build_clip_splits, collate_clip
from stillroom.domains.vl.clip_teacher import build_clip, text_cache
from stillroom.domains.vl.clip_train import ClipForward, ClipObjective, info_nce


def test_info_nce_with_distinct_captions_is_clips_symmetric_cross_entropy():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    total, i2t, t2i = info_nce(image, text, torch.tensor(7.0), torch.arange(5))
    logits = 7.0 * image @ text.T
    want_i2t = F.cross_entropy(logits, torch.arange(5), reduction="sum")
    want_t2i = F.cross_entropy(logits.T, torch.arange(5), reduction="sum")
    assert torch.allclose(i2t, want_i2t) and torch.allclose(t2i, want_t2i)
    assert torch.allclose(total, 0.5 * (want_i2t + want_t2i))


def test_info_nce_by_hand_with_a_repeated_caption():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # both images have the same caption
    total, i2t, _ = info_nce(image, text, torch.tensor(1.0), torch.tensor([4, 4]))
    # each row's targets are 1/2, 1/2 over two equal logits: -log(1/2) per image and direction
    assert math.isclose(float(i2t), 2 * math.log(2), rel_tol=1e-6)
    # text->image: rows [1, 0] -> -(0.5 log s(1) + 0.5 log s(0)) with s = softmax([1, 0]), twice
    s = torch.tensor([1.0, 0.0]).log_softmax(0)
    t2i = -2 * 0.5 * (s[0] + s[1])
    assert math.isclose(float(total), float(0.5 * (i2t + t2i)), rel_tol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = tiny_clip_config(tiny_text_folder(tmp_path_factory.mktemp("text")))
    data = build_clip_splits(cfg, None, 0)
    return cfg, data


def _loss_and_grads(model, forward, batch):
    model.zero_grad(set_to_none=True)
    result = ClipObjective(forward).loss(forward(batch), batch, None)
    result.total.backward()
    return result.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_text_features_give_the_same_loss_and_gradients(setup):
    cfg, data = setup
    model, _ = build_clip(cfg, seed=0)
    cache = text_cache(model, cfg, data)
    batch = collate_clip(data.train[::3][:24])
    plain_loss, plain_grads = _loss_and_grads(model, ClipForward(model), batch)
    cached_loss, cached_grads = _loss_and_grads(model, ClipForward(model, cache), batch)
    assert torch.allclose(plain_loss, cached_loss, atol=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and "model.text_projection.weight" in plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, cached_grads[name], atol=1e-5), name


def test_no_cache_for_a_tuned_tower(setup):
    cfg, data = setup
    tuned = cfg.model_copy(update={"text_tower": "tuned"})
    model, _ = build_clip(tuned, seed=0)
    assert text_cache(model, tuned, data) is None
    batch = collate_clip(data.train[:8])
    _, grads = _loss_and_grads(model, ClipForward(model), batch)
    assert any(n.startswith("model.text_model.") for n in grads)
