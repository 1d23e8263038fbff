"""Self-distillation for further pre-training: the [CLS] regression and L2-SP against hand values, the
unmasked second forward, the objective's sum, and the config checks."""

import pytest
import torch
from pydantic import ValidationError

from stillroom.config.mae import SelfDistillFptConfig
from stillroom.config.schema import RunConfig
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.hf_models import build_vit_mae
from stillroom.domains.vision.mae import encode_unmasked, shift_images
from stillroom.methods.self_distill_fpt import build_objective, cls_regression, l2sp_penalty


def mae(seed=0):
    return build_vit_mae((1, 8, 8), hidden_size=16, layers=2, heads=2, decoder_hidden_size=16, decoder_layers=1,
                         seed=seed)


def batch(n=3):
    return ImageBatch(torch.rand(n, 1, 8, 8), torch.zeros(n, 1, dtype=torch.long), [f"u{i}" for i in range(n)])


def test_cls_regression_hand_value():
    total, count = cls_regression(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert count == 2 and total.item() == 1 + 4 + 4 + 9
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    total, count = cls_regression(s, t)
    assert (total / count).item() == pytest.approx(torch.nn.MSELoss(reduction="sum")(s, t).item() / 5)


def test_l2sp_hand_value():
    assert l2sp_penalty({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])},
                        {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}).item() == 1 + 4 + 4


def test_regression_uses_the_unmasked_cls_of_both():
    student, teacher = mae(0), mae(1)
    objective = build_objective(student, teacher, SelfDistillFptConfig(), seed=0, shift=1)
    b = batch()
    outputs, signal = objective.forward(b), objective.signal(b)
    images = shift_images(b.inputs, b.uids, 0, 0, 1)  # the same shifted images the MAE forward masks
    assert torch.allclose(signal, encode_unmasked(teacher, images)[:, 0], atol=1e-6)
    assert torch.allclose(outputs["cls"], encode_unmasked(student, images)[:, 0], atol=1e-6)
    assert outputs["mask"].sum() == 3 * 12  # the MAE forward is still masked at 0.75
    result = objective.loss(outputs, b, signal)
    reg = ((outputs["cls"] - signal) ** 2).sum().item()
    assert result.total.item() == pytest.approx(result.parts["mae"] + reg, rel=1e-5)
    assert result.parts["cls_regression"] == pytest.approx(reg, rel=1e-5)


def test_l2sp_is_zero_at_theta0_and_counts_once_per_step():
    student = mae(0)
    objective = build_objective(student, None, SelfDistillFptConfig(regularizer="l2sp", weight=2.0), seed=0, shift=0)
    b = batch()
    assert objective.signal(b) is None
    assert objective.loss(objective.forward(b), b, None).parts["l2sp"] == 0.0
    with torch.no_grad():
        student.vit.layernorm.bias.add_(0.5)  # 16 entries moved by 0.5: ||d||^2 = 4
    result = objective.loss(objective.forward(b), b, None)
    assert result.parts["l2sp"] == pytest.approx(4.0 * 3)  # times the micro-batch's images: once per step
    assert result.total.item() == pytest.approx(result.parts["mae"] + 2.0 * 12.0, rel=1e-5)


def test_config_checks():
    with pytest.raises(ValidationError, match="mae.student_path"):
        RunConfig(domain="mae", method="self_distill_fpt")
    with pytest.raises(ValidationError, match="mae.teacher.path"):
        RunConfig.model_validate({"domain": "mae", "method": "self_distill_fpt", "mae": {"student_path": "/x"}})
    RunConfig.model_validate({"domain": "mae", "method": "self_distill_fpt", "mae": {"student_path": "/x"},
                              "self_distill_fpt": {"regularizer": "l2sp"}})
    with pytest.raises(ValidationError, match="set domain: mae"):
        RunConfig(method="self_distill_fpt")
