"""Projectors: shapes of each kind on features and conv maps, linear = 1x1 conv, resizing, and the loss mix's
projections built by the same factory with the parameter names and initialisation they always had."""

import pytest
import torch

from stillroom.config.core import LossConfig, LossTerm
from stillroom.losses import LossMix
from stillroom.models.projectors import MapProjector, build_projector


@pytest.mark.parametrize("kind, linears", [("linear", 1), ("mlp1", 2), ("mlp2", 3)])
def test_kinds_map_the_last_dimension(kind, linears):
    proj = build_projector(kind, 6, 10)
    assert proj(torch.randn(2, 5, 6)).shape == (2, 5, 10)
    layers = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == linears and all(m.out_features == 10 for m in layers)  # hidden = teacher width
    assert sum(isinstance(m, torch.nn.GELU) for m in proj.modules()) == linears - 1


def test_linear_map_projector_is_a_1x1_conv():
    proj = MapProjector("linear", 4, 7)
    x = torch.randn(2, 4, 3, 5)
    conv = torch.nn.functional.conv2d(x, proj.proj.weight[:, :, None, None], proj.proj.bias)
    assert torch.allclose(proj(x), conv, atol=1e-6)


def test_map_projector_resizes_to_the_teachers_size():
    proj = MapProjector("mlp1", 4, 6)
    x = torch.randn(2, 4, 2, 2)
    out = proj(x, size=(4, 4))
    assert out.shape == (2, 6, 4, 4)
    resized = torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(out, proj(resized))
    assert torch.equal(proj(x, size=(2, 2)), proj(x))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        proj(torch.randn(2, 4, 3))


def test_bad_kind_or_width_is_refused():
    with pytest.raises(ValueError, match="not one of linear, mlp1, mlp2"):
        build_projector("conv", 4, 4)
    with pytest.raises(ValueError, match=">= 1"):
        build_projector("linear", 0, 4)


def test_loss_mix_projections_come_from_the_factory_unchanged():
    cfg = LossConfig(terms=[LossTerm(name="hidden_mse", params={"layers": [[1, 2], [2, 4]]})])
    torch.manual_seed(0)
    mix = LossMix(cfg, student_hidden=8, teacher_hidden=12, student_layers=2, teacher_layers=4)
    assert sorted(mix.state_dict()) == ["projections.t0_s1.weight", "projections.t0_s2.weight"]
    torch.manual_seed(0)
    want = [torch.nn.Linear(8, 12, bias=False).weight for _ in range(2)]
    assert all(torch.equal(mix.projections[f"t0_s{s}"].weight, w) for s, w in zip((1, 2), want))
