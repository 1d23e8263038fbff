"""Weight interpolation (LERP) of two fine-tunings of one model (spec 9.2's merging: ``theta_lambda = (1 - lambda)
* theta_q + lambda * theta_d``), the deploy-time quality-diversity knob of ``cfg_distill``."""

from __future__ import annotations

import copy

import torch
from torch import nn


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Refuse two models whose state dicts differ in parameter names or shapes (naming the first difference)."""
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if set(state_a) != set(state_b):
        only_a, only_b = sorted(set(state_a) - set(state_b)), sorted(set(state_b) - set(state_a))
        raise ValueError(f"interpolate: the models differ in parameter names (only in model_a: {only_a[:3]}, only "
                         f"in model_b: {only_b[:3]}); interpolate two fine-tunings of the same architecture")
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise ValueError(f"interpolate: parameter {name!r} has shape {tuple(tensor.shape)} in model_a and "
                             f"{tuple(state_b[name].shape)} in model_b; interpolate models of the same architecture")


@torch.no_grad()
def interpolate(model_a: nn.Module, model_b: nn.Module, lam: float) -> nn.Module:
    """A new model (a copy of ``model_a``) with weights ``(1 - lam) * a + lam * b`` for every floating-point tensor
    (``lam = 0``: ``a`` exactly, ``1``: ``b`` exactly); other tensors must be equal in both."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"interpolate: lam={lam} must lie in [0, 1]")
    check_same_architecture(model_a, model_b)
    state_b = model_b.state_dict()
    mixed = {}
    for name, tensor in model_a.state_dict().items():
        other = state_b[name].to(tensor.device)
        if tensor.is_floating_point():
            mixed[name] = (1 - lam) * tensor + lam * other
        elif torch.equal(tensor, other):
            mixed[name] = tensor.clone()
        else:
            raise ValueError(f"interpolate: non-float tensor {name!r} differs between the models")
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(mixed)
    return merged
