"""The score-distillation engine's primitives (spec 0.1 item 6), shared by every generative method.

* :func:`proxy_loss`: apply a chosen gradient ``g`` to a generated tensor ``x`` through autograd: the loss
  ``0.5 * ||x - stopgrad(x - g)||^2`` has gradient exactly ``g`` with respect to ``x`` (tested);
* :func:`dmd_direction`: DMD's per-sample normalised distribution-matching gradient from the real (teacher)
  and fake (critic) clean-sample predictions at a re-noised point;
* :func:`denoising_loss`: the x0 regression every denoiser trains with (the teacher on data, a fake-score
  critic on generator samples, a TSM student on the teacher's predictions), weighted so it equals the loss on
  the network's raw output (:meth:`~.conventions.Convention.output_weight`);
* :func:`renoise_at`: re-noise clean samples at noise fractions ``u`` under the model's convention.

Losses return ``(sum over samples, number of samples)`` as the loop expects.
"""

from __future__ import annotations

import torch

from stillroom.domains.generative.conventions import Convention


def proxy_loss(x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(0.5 * sum ||x - sg(x - g)||^2, B)``: its gradient with respect to ``x [B, ...]`` is ``g`` (x's shape)."""
    target = (x - g).detach()
    return 0.5 * ((x - target) ** 2).sum(), x.shape[0]


def dmd_direction(x: torch.Tensor, mu_real: torch.Tensor, mu_fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient on generated samples ``x [B, ...]``: ``(mu_fake - mu_real) / mean_dims |x - mu_real|`` per
    sample (descending it moves ``x`` toward the teacher's prediction and away from the critic's; DMD2's
    normaliser keeps the step size independent of the noise level). No gradient flows through it."""
    dims = tuple(range(1, x.dim()))
    norm = (x - mu_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return ((mu_fake - mu_real) / norm).detach()


def renoise_at(conv: Convention, x0: torch.Tensor, u_b: torch.Tensor,
               eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, t_b)``: ``x0 [B, ...]`` re-noised at noise fractions ``u_b [B]`` (fresh noise unless given)."""
    t = conv.time(u_b)
    eps = torch.randn_like(x0) if eps is None else eps
    return conv.renoise(x0, t, eps), t


def denoising_loss(x0_hat: torch.Tensor, target: torch.Tensor, t_b: torch.Tensor,
                   conv: Convention) -> tuple[torch.Tensor, int]:
    """``(sum_b w(t_b) * ||x0_hat_b - target_b||^2, B)`` with the convention's output weight ``w``."""
    dims = tuple(range(1, x0_hat.dim()))
    sq = ((x0_hat.float() - target.float()) ** 2).sum(dim=dims)
    return (conv.output_weight(t_b).float() * sq).sum(), x0_hat.shape[0]


def condition_contrast(model, x_t: torch.Tensor, t_b: torch.Tensor, target: torch.Tensor, labels_b: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, int]:
    """``(sum over conditioned rows of CE(-e_b / temperature, labels_b), rows)``: the conditional contrastive term.

    ``e_b[c] = ||x0_hat(x_t, t, c) - target||^2 / D`` is the denoising error of sample ``b`` under every class
    ``c`` (one batched forward of ``[B * K, ...]``); the cross-entropy asks the true class to explain the sample
    best, i.e. the prediction must depend on the condition (the step-wise variant of the conditional contrastive
    loss of discrete contrastive diffusion, Zhu et al. 2023, on a continuous denoiser's error in place of its
    ELBO term). Rows whose label is the null label (condition dropout) are left out.
    """
    keep = labels_b != model.null_label
    if not bool(keep.any()):
        return x_t.new_zeros(()), 0
    x_t, t_b, target, labels_b = x_t[keep], t_b[keep], target[keep], labels_b[keep]
    b, k = x_t.shape[0], model.num_classes
    every = torch.arange(k, device=x_t.device).repeat(b)
    pred = model(x_t.repeat_interleave(k, 0), t_b.repeat_interleave(k, 0), every)
    err_bk = ((pred.float() - target.float().repeat_interleave(k, 0)) ** 2).flatten(1).mean(1).view(b, k)
    return torch.nn.functional.cross_entropy(-err_bk / temperature, labels_b, reduction="sum"), b


def drop_labels(labels_b: torch.Tensor, null_label: int, p: float) -> torch.Tensor:
    """``labels_b`` with each replaced by ``null_label`` with probability ``p`` (classifier-free guidance
    training's condition dropout)."""
    if p <= 0:
        return labels_b
    drop = torch.rand(labels_b.shape, device=labels_b.device) < p
    return torch.where(drop, torch.full_like(labels_b, null_label), labels_b)


def meanvar_kl(x: torch.Tensor, mu_tgt: torch.Tensor, var_tgt: torch.Tensor, over: str = "sample",
               eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """Decoupled DMD's mean/variance KL regulariser (spec 10.3) on samples ``x [B, ...]``, ``(sum, B)``.

    ``over="sample"``: each sample's mean ``m_i`` and (population) variance ``s_i^2`` over its dimensions,
    ``sum_i 0.5 ((s_i^2 + (m_i - mu_tgt)^2) / var_tgt - 1 - log(s_i^2 / var_tgt))`` with scalar targets.
    ``over="batch"``: the same KL of each dimension's mean and variance over the batch (targets ``[D...]`` or
    scalars), summed over dimensions and scaled by ``B`` so that the loop's division by the sample count gives
    the KL itself. Gradients flow into ``x`` (a differentiable loss, not a proxy)."""
    xf = x.float().flatten(1)
    if over == "sample":
        m, v = xf.mean(dim=1), xf.var(dim=1, unbiased=False)
    elif over == "batch":
        m, v = xf.mean(dim=0), xf.var(dim=0, unbiased=False)
    else:
        raise ValueError(f"meanvar_kl: over must be 'sample' or 'batch' (got {over!r})")
    mu_tgt = torch.as_tensor(mu_tgt, dtype=xf.dtype, device=xf.device).flatten()
    var_tgt = torch.as_tensor(var_tgt, dtype=xf.dtype, device=xf.device).flatten()
    v = v.clamp_min(eps)
    kl = 0.5 * ((v + (m - mu_tgt) ** 2) / var_tgt - 1 - torch.log(v / var_tgt))
    b = x.shape[0]
    return (kl.sum() if over == "sample" else kl.sum() * b), b
