"""Weight interpolation: exact endpoints, the mean at 0.5, a named error for different architectures."""

import pytest
import torch
from torch import nn

from stillroom.domains.autoregressive.interpolate import interpolate


def two_models():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_endpoints_are_exact_and_half_is_the_mean():
    a, b = two_models()
    for lam, expected in ((0.0, a), (1.0, b)):
        merged = interpolate(a, b, lam)
        for name, tensor in merged.state_dict().items():
            assert torch.equal(tensor, expected.state_dict()[name]), name
    half = interpolate(a, b, 0.5).state_dict()
    for name, tensor in half.items():
        assert torch.allclose(tensor, (a.state_dict()[name] + b.state_dict()[name]) / 2, atol=1e-7)
    assert interpolate(a, b, 0.5) is not a


def test_different_architectures_are_refused_by_name():
    a, _ = two_models()
    wider = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 3\)"):
        interpolate(a, wider, 0.5)
    with pytest.raises(ValueError, match="parameter names"):
        interpolate(a, nn.Sequential(nn.Linear(3, 4)), 0.5)
