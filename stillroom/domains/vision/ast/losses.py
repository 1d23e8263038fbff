"""AST's loss pieces as pure functions (spec section 5.2-5.3): each returns ``(sum, count)`` or a factor.

* :func:`clip_loss_factor`: the expert's "clipping loss" scale of epoch ``e``;
* :func:`input_gradient_penalty`: the expert's penalty on the input gradient of its summed logits;
* :func:`balanced_factor`: the inner CE's scale for start epoch ``s`` (``--balance_loss``);
* :func:`normalised_distance`: ``||a - b||^2 / ||start - b||^2`` over flattened parameters (the outer loss);
* :func:`perturb_weights`: the element-wise relative perturbation of 4-D (conv) weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def clip_loss_factor(epoch: int, *, start: float = 0.5, epochs: int = 10) -> float:
    """``start + (1 - start) * epoch / epochs`` for ``epoch < epochs``, else 1 (0.5, 0.55, ..., 0.95, 1, ...)."""
    if epoch >= epochs:
        return 1.0
    return start + (1.0 - start) * epoch / epochs


def input_gradient_penalty(model: Callable[[torch.Tensor], torch.Tensor], images_bchw: torch.Tensor,
                           weight: float) -> tuple[torch.Tensor, int]:
    """``(weight * sum_{b,h,w} (||d sum(model(x)) / dx[b, :, h, w]||_2 - 1)^2, B * H * W)``.

    The gradient of the summed logits ``[B, K]`` with respect to ``images_bchw`` ``[B, C, H, W]`` is taken with
    ``create_graph=True`` (so the penalty trains the parameters), its L2 norm over the channel axis leaves
    ``[B, H, W]``; dividing the sum by the count gives AST's mean. Why: it keeps the expert's input
    sensitivity near 1 everywhere, one of the two regularisers that make its trajectory smooth."""
    x_bchw = images_bchw.detach().requires_grad_(True)
    logits_bk = model(x_bchw)
    (grad_bchw,) = torch.autograd.grad(logits_bk.sum(), x_bchw, create_graph=True)
    norm_bhw = grad_bchw.pow(2).sum(dim=1).add(1e-12).sqrt()
    return weight * (norm_bhw - 1.0).pow(2).sum(), norm_bhw.numel()


def balanced_factor(start_epoch: int, max_start_epoch: int) -> float:
    """AST's ``--balance_loss`` scale of the inner CE: ``log_5(s - T/2 + 8)`` when ``s >= T/2``, else
    ``1 / log_5(T/2 - s + 8)`` (``T = max_start_epoch``): late starts (slow experts) learn harder, early
    starts (fast ones) softer, so every start epoch moves the synthetic set about as much."""
    half = max_start_epoch / 2
    if start_epoch >= half:
        return math.log(start_epoch - half + 8, 5)
    return 1.0 / math.log(half - start_epoch + 8, 5)


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parameters concatenated in name order: ``[P]``."""
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def normalised_distance(student_p: torch.Tensor, target_p: torch.Tensor, start_p: torch.Tensor
                        ) -> tuple[torch.Tensor, int]:
    """``(||student - target||^2 / ||start - target||^2, 1)`` of flattened parameters ``[P]``.

    The normaliser (no gradient: ``target`` and ``start`` are expert checkpoints) makes the loss 1 when the
    student did not move from ``start``, and 0 when it lands on ``target``, whatever the epoch's speed."""
    num = (student_p - target_p).pow(2).sum()
    den = (start_p - target_p).pow(2).sum().clamp_min(1e-12)
    return num / den, 1


def perturb_weights(params: dict[str, torch.Tensor], alpha: float, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """``params`` with every 4-D tensor ``W`` replaced by ``W + alpha * (d / ||d||_F) * W``, ``d`` standard
    normal (drawn from ``generator`` in name order); other tensors unchanged (the same objects)."""
    out = {}
    for name in sorted(params):
        w = params[name]
        if w.ndim == 4 and alpha:
            d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
            w = w + alpha * (d / d.norm()) * w
        out[name] = w
    return out
