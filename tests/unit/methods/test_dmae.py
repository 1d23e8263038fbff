"""DMAE: the feature distance against hand values, the shared mask, the truncated teacher, the all-token
ablation's gather, the aligned-block heuristic and the config checks."""

import pytest
import torch
from pydantic import ValidationError

from stillroom.config.mae import DmaeConfig
from stillroom.config.schema import RunConfig
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.hf_models import build_vit_mae
from stillroom.domains.vision.mae import mask_noise, to_pixel_values, unmasked, unmasked_noise
from stillroom.domains.vision.mae_domain import aligned_block, dmae_pairs
from stillroom.methods.dmae import DmaeTeacher, build_objective, feature_distance, visible_tokens


def mae(hidden=16, layers=3, seed=0):
    return build_vit_mae((1, 8, 8), hidden_size=hidden, layers=layers, heads=2, decoder_hidden_size=16,
                         decoder_layers=1, seed=seed)


def batch(n=3):
    return ImageBatch(torch.rand(n, 1, 8, 8), torch.zeros(n, 1, dtype=torch.long), [f"u{i}" for i in range(n)])


def test_feature_distance_hand_values():
    s = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # one image, two tokens
    t = torch.tensor([[[0.0, 2.0], [0.0, 1.0]]])
    total, count = feature_distance(s, t, distance="l1", normalize=True)
    # normalised: s -> (0.6, 0.8), (1, 0); t -> (0, 1), (0, 1); |diff| = (0.6, 0.2), (1, 1): mean 2.8 / 4
    assert count == 1 and total.item() == pytest.approx(0.7)
    total, _ = feature_distance(s, t, distance="l2", normalize=False)
    assert total.item() == pytest.approx((9 + 4 + 1 + 1) / 4)


def test_feature_distance_is_l1loss_mean_over_images():
    s, t = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    total, count = feature_distance(s, t, distance="l1", normalize=False)
    assert (total / count).item() == pytest.approx(torch.nn.L1Loss()(s, t).item(), rel=1e-6)


def test_student_and_teacher_keep_the_same_visible_patches():
    """The teacher's signal uses the student's noise: the teacher's own masked forward with that noise keeps
    exactly the patches the student kept (same mask), and the signal equals that forward's block output."""
    student, teacher = mae(16, 2), mae(32, 3, seed=1)
    objective = build_objective(student, teacher, DmaeConfig(), [(1, 2)], seed=0, shift=1)
    b = batch()
    signal = objective.signal(b)
    outputs = objective.forward(b)
    pixels, noise = objective.forward.inputs(b)
    with torch.no_grad():
        full = teacher(pixel_values=pixels, noise=noise, output_hidden_states=True)
    assert torch.equal(full.mask, outputs["mask"])
    assert torch.allclose(signal[2], full.hidden_states[3], atol=1e-6)
    assert signal[2].shape == (3, 1 + 4, 32) and outputs["hidden_states"][2].shape == (3, 5, 16)


def test_truncated_teacher_equals_full_forward_and_skips_later_blocks():
    teacher = mae(32, 4)
    calls = []
    teacher.vit.layers[3].register_forward_hook(lambda *a: calls.append(1))
    pixels, noise = to_pixel_values(torch.rand(2, 1, 8, 8)), mask_noise(["a", "b"], 0, 0, 16)
    features = DmaeTeacher(teacher, [1], "visible").features(pixels, noise)
    assert calls == []  # block 3 and the decoder never ran
    full = teacher(pixel_values=pixels, noise=noise, output_hidden_states=True)
    assert torch.allclose(features[1], full.hidden_states[2], atol=1e-6)


def test_all_token_teacher_keeps_the_visible_tokens():
    """At the embeddings (before any attention) the visible tokens of the all-token forward are the masked
    forward's tokens: the gather picks [CLS] and the same patches in the same order."""
    teacher = mae(32, 2)
    pixels, noise = to_pixel_values(torch.rand(2, 1, 8, 8)), mask_noise(["a", "b"], 0, 0, 16)
    masked = teacher(pixel_values=pixels, noise=noise, output_hidden_states=True).hidden_states[0]
    with unmasked(teacher):
        every = teacher.vit(pixel_values=pixels, noise=unmasked_noise(teacher, 2, pixels.device),
                            output_hidden_states=True).hidden_states[0]
    assert torch.allclose(visible_tokens(every, noise, 4), masked, atol=1e-6)
    features = DmaeTeacher(teacher, [1], "all").features(pixels, noise)
    assert features[1].shape == (2, 5, 32)


def test_loss_is_mae_plus_weighted_feature_term():
    student, teacher = mae(16, 2), mae(32, 3, seed=1)
    objective = build_objective(student, teacher, DmaeConfig(weight=0.5), [(1, 2)], seed=0, shift=0)
    b = batch()
    outputs, signal = objective.forward(b), objective.signal(b)
    result = objective.loss(outputs, b, signal)
    assert result.count == 3
    expected = result.parts["mae"] + 0.5 * result.parts["feat_1_2"]
    assert result.total.item() == pytest.approx(expected, rel=1e-5)
    result.total.backward()
    assert objective.state["projectors"][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_aligned_blocks_default_to_the_released_relative_depth():
    assert aligned_block(12, 0.75) == 8 and aligned_block(24, 0.75) == 17
    assert dmae_pairs(DmaeConfig(), 4, 6) == [(2, 4)]
    assert dmae_pairs(DmaeConfig(student_layers=[0, 1], teacher_layers=[2, 3]), 2, 4) == [(0, 2), (1, 3)]
    with pytest.raises(ValueError, match="dmae.teacher_layers"):
        dmae_pairs(DmaeConfig(student_layers=[0], teacher_layers=[9]), 2, 4)


def test_config_checks():
    with pytest.raises(ValidationError, match="set domain: mae"):
        RunConfig(domain="classifier", method="dmae")
    with pytest.raises(ValidationError, match="go together"):
        RunConfig.model_validate({"domain": "mae", "method": "dmae", "dmae": {"student_layers": [1]}})
    with pytest.raises(ValidationError, match="`dmae` section is set"):
        RunConfig.model_validate({"domain": "mae", "method": "sft", "dmae": {}})
