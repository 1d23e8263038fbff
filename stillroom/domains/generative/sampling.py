"""Samplers of denoisers, in any time convention, with classifier-free guidance.

:func:`generate` is the one sampler: ``steps`` evaluations of the model at the noise fractions
``1, 1 - 1/steps, ..., 1/steps`` (:func:`~.conventions.timestep_fractions`), each predicting the clean sample
``x0_hat`` and moving to the next level either deterministically (DDIM: re-noise ``x0_hat`` with the noise
the current point implies, i.e. Euler on the probability-flow ODE of these linear interpolants) or
stochastically (re-noise with fresh noise: DMD2's backward simulation and TwinFlow's "few" sampler). One step
is the one-step generator ``x0_hat(prior, u = 1)``. It is differentiable unless called under ``no_grad``
(a student generates with gradients; :func:`sample` is the no-grad form for evaluation).

With ``fractions`` running from 1 to 0 under ``edm`` it is diffusers' ``EDMEulerScheduler`` step for step (a
parity test holds it).

Guidance: ``x0 = x0_uncond + w * (x0_cond - x0_uncond)`` (``w = 1``: none, one forward; otherwise the
conditional and null-label halves run as one batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from stillroom.domains.generative.conventions import per_sample, timestep_fractions
from stillroom.domains.generative.models import Denoiser


@dataclass(frozen=True)
class Steer:
    """Steered sampling (Nair et al. 2023; spec 15, a teacher-side sampler option): at every step the clean
    prediction is moved by the gradient of a differentiable per-sample ``loss(x0_hat [B, ...], targets [B]) ->
    [B]`` of an off-the-shelf recognition model, taken through the denoiser:

        x0' = x0_hat - scale * (b^2 / a) * grad_{x_t} loss(x0_hat(x_t), targets)

    with ``x_t = a x0 + b eps`` at the step's time. With ``loss = -log p(c | x0_hat)`` this is classifier
    guidance (``x0_hat + (b^2/a) grad log p(c | x_t)``) with ``p(c | x_t)`` approximated at the predicted clean
    sample. ``unconditional``: the model reads the null label and only the loss conditions the sample (an
    unconditional teacher turned into a conditional sampler)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: float
    unconditional: bool = True


def steered_x0(model: Denoiser, x_t: torch.Tensor, t_b: torch.Tensor, labels_b: torch.Tensor, guidance: float,
               steer: Steer) -> torch.Tensor:
    """``x0'`` of :class:`Steer` at ``(x_t, t_b)`` (detached; the steering gradient runs even under no_grad)."""
    model_labels = torch.full_like(labels_b, model.null_label) if steer.unconditional else labels_b
    if steer.scale == 0:
        return guided_x0(model, x_t, t_b, model_labels, guidance)
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        x0 = guided_x0(model, x_in, t_b, model_labels, guidance)
        (grad,) = torch.autograd.grad(steer.loss(x0, labels_b).sum(), x_in)
    a, b = (per_sample(c, x_t) for c in model.convention.coefficients(t_b))
    # a flow's first step (t = 1 noise) has a = 0: the ideal product stays finite (the denoiser's Jacobian
    # carries a factor a / b^2), so the coefficient is bounded there instead of dividing by zero
    return x0.detach() - steer.scale * (b * b / a.clamp_min(1e-3)) * grad


def guided_x0(model: Denoiser, x_t: torch.Tensor, t_b: torch.Tensor, labels_b: torch.Tensor,
              guidance: float = 1.0) -> torch.Tensor:
    """``x0_hat [B, ...]`` of ``model`` at ``(x_t, t_b)`` for ``labels_b``, guided with scale ``guidance``."""
    if guidance == 1.0:
        return model(x_t, t_b, labels_b)
    null = torch.full_like(labels_b, model.null_label)
    both = model(torch.cat([x_t, x_t]), torch.cat([t_b, t_b]), torch.cat([labels_b, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def generate(model: Denoiser, noise: torch.Tensor, labels_b: torch.Tensor, *, steps: int, guidance: float = 1.0,
             stochastic: bool = False, generator: torch.Generator | None = None,
             fractions: list[float] | None = None, steer: Steer | None = None) -> torch.Tensor:
    """Samples ``[B, ...]`` from ``noise`` (a draw of :meth:`Convention.prior`, the sample shape) for ``labels_b``
    in ``steps`` model evaluations (see the module docstring); ``fractions`` overrides the noise fractions
    visited (descending, first 1.0); ``steer`` moves every clean prediction (:class:`Steer`)."""
    conv = model.convention
    fracs = fractions if fractions is not None else timestep_fractions(steps)
    x = noise
    b = noise.shape[0]
    for i, u in enumerate(fracs):
        t = conv.time(torch.full((b,), float(u), device=noise.device))
        x0 = guided_x0(model, x, t, labels_b, guidance) if steer is None else steered_x0(
            model, x, t, labels_b, guidance, steer)
        if i == len(fracs) - 1:
            return x0
        t_next = conv.time(torch.full((b,), float(fracs[i + 1]), device=noise.device))
        eps = (torch.randn(x0.shape, generator=generator, device=x0.device) if stochastic
               else conv.eps_from(x, t, x0))
        x = conv.renoise(x0, t_next, eps)
    return x


@torch.no_grad()
def sample(model: Denoiser, labels_b: torch.Tensor, *, steps: int, guidance: float = 1.0, stochastic: bool = False,
           generator: torch.Generator | None = None, batch_size: int = 4096,
           fractions: list[float] | None = None, steer: Steer | None = None) -> torch.Tensor:
    """``[B, ...]`` samples for ``labels_b`` in eval mode, ``batch_size`` at a time (noise from ``generator``;
    ``fractions``: as :func:`generate`'s)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(labels_b), batch_size):
        labels = labels_b[i:i + batch_size].to(device)
        noise = model.convention.prior((len(labels), *model.sample_shape()), generator=generator).to(device)
        out.append(generate(model, noise, labels, steps=steps, guidance=guidance, stochastic=stochastic,
                            generator=generator, fractions=fractions, steer=steer).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, *model.sample_shape())
