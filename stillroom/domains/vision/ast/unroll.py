"""The differentiable inner loop of trajectory matching (spec 5.3 step 3): N SGD steps on the synthetic set.

From ``start`` parameters (an expert checkpoint, perhaps perturbed), each step draws ``batch_syn`` synthetic
images (a permutation per pass, from ``generator``), computes ``factor * CE`` of the network run with the
current parameters through ``torch.func.functional_call``, takes its gradient with ``create_graph=True``
and steps ``theta_(k+1) = theta_k - lr * b_k``, ``b_k = momentum * b_(k-1) + g_k``. Every parameter set stays
in the autograd graph, so the outer loss differentiates through all N steps to the images and to ``lr``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def unroll(model: torch.nn.Module, start: dict[str, torch.Tensor], images_kchw: torch.Tensor, labels_k: torch.Tensor,
           *, lr: torch.Tensor, steps: int, batch_syn: int | None, momentum: float, factor: float,
           generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """The parameters after each of ``steps`` inner steps, ``[theta_0 = start, theta_1, ..., theta_N]``.

    ``model``: the architecture (its own weights are unused); ``images_kchw`` ``[K, C, H, W]`` and ``lr`` (a
    scalar tensor) carry gradients; ``factor``: the inner CE's scale (:func:`~.losses.balanced_factor`)."""
    names = sorted(start)
    theta = [start[n].detach().clone().requires_grad_(True) for n in names]
    params = [dict(zip(names, theta))]
    velocity = [torch.zeros_like(t) for t in theta]
    k = len(labels_k)
    size = min(batch_syn or k, k)
    order = torch.randperm(k, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + size > k:
            order, cursor = torch.randperm(k, generator=generator), 0
        idx = order[cursor : cursor + size].to(images_kchw.device)
        cursor += size
        logits_bk = functional_call(model, params[-1], (images_kchw[idx],))
        loss = factor * F.cross_entropy(logits_bk, labels_k[idx])
        grads = torch.autograd.grad(loss, theta, create_graph=True)
        velocity = [momentum * v + g for v, g in zip(velocity, grads)]
        theta = [t - lr * v for t, v in zip(theta, velocity)]
        params.append(dict(zip(names, theta)))
    return params
