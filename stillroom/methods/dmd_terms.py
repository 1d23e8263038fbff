"""The terms of ``method: dmd`` as pure functions and small modules (docs/methods/dmd.md).

Every direction ``g [B, ...]`` (x's shape) is a *gradient* on the generated samples ``x``: the generator applies
it through :func:`~stillroom.domains.generative.engine.proxy_loss`, so gradient descent moves ``x`` along
``-g``. Noise levels are noise fractions ``u`` in [0, 1] (0 clean, 1 pure noise), drawn from the global torch
RNG (checkpointed: a resumed run draws the same).

* ``dm``: :func:`~stillroom.domains.generative.engine.dmd_direction`, ``(mu_fake - mu_real) / mean|x - mu_real|``;
* ``ca``: :func:`ca_direction`, ``-(alpha - 1)(mu_cond - mu_uncond) / mean|x - mu_cfg|`` with
  ``mu_cfg = mu_uncond + alpha (mu_cond - mu_uncond)``: the part of the coupled DMD direction with a guided real
  score that the guidance adds (spec 10.3), so ``dm`` at guidance 1 plus ``ca`` at alpha, both at the same
  point and with the same normaliser, is exactly ``dm`` at guidance alpha (tested);
* ``gan``: DMD2's non-saturating losses on a :class:`ClassifierHead` that reads the critic's features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.domains.generative.conventions import timestep_fractions
from stillroom.domains.generative.models import Denoiser


def draw_fractions(n: int, lo: float, hi, device: torch.device | str) -> torch.Tensor:
    """``[n]`` noise fractions ``u ~ U(lo, hi)`` (``hi`` a float or a ``[n]`` tensor of upper ends)."""
    hi_n = torch.as_tensor(hi, dtype=torch.float32, device=device).expand(n)
    return lo + torch.rand(n, device=device) * (hi_n - lo).clamp_min(0.0)


def ca_fractions(n: int, ca_range: list[float], schedule: str, u_in: float,
                 device: torch.device | str) -> torch.Tensor:
    """``[n]`` noise fractions of the CA term: ``U(ca_range)`` (``full``), or only levels cleaner than the
    generator step's input ``u_in`` (``below_input``: ``U(lo, min(hi, u_in))``; Decoupled DMD's ``tau_CA > t``)."""
    lo, hi = ca_range
    if schedule == "below_input":
        hi = max(lo, min(hi, u_in))
    return draw_fractions(n, lo, hi, device)


def per_sample_scale(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[B, 1, ...]`` DMD's normaliser ``mean over dimensions |x - ref|`` (clamped away from 0)."""
    dims = tuple(range(1, x.dim()))
    return (x - ref).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)


def ca_direction(x: torch.Tensor, mu_cond: torch.Tensor, mu_uncond: torch.Tensor, alpha: float) -> torch.Tensor:
    """Decoupled DMD's CFG-augmentation gradient on ``x [B, ...]`` (see the module docstring): descending it moves
    ``x`` along ``mu_cond - mu_uncond``, toward the guided teacher. Detached."""
    mu_cfg = mu_uncond + alpha * (mu_cond - mu_uncond)
    return (-(alpha - 1.0) * (mu_cond - mu_uncond) / per_sample_scale(x, mu_cfg)).detach()


@torch.no_grad()
def cond_uncond(teacher: Denoiser, x_t: torch.Tensor, t_b: torch.Tensor,
                labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu_cond, mu_uncond)`` of ``teacher`` at ``(x_t, t_b)``, both ``[B, ...]``, in one batched forward."""
    null = torch.full_like(labels_b, teacher.null_label)
    both = teacher(torch.cat([x_t, x_t]), torch.cat([t_b, t_b]), torch.cat([labels_b, null]))
    return both.chunk(2)


def direction_norm(g: torch.Tensor) -> float:
    """Mean over samples of the L2 norm of ``g [B, ...]`` (a logged metric)."""
    return float(g.flatten(1).norm(dim=1).mean())


@torch.no_grad()
def step_input(model: Denoiser, z: torch.Tensor, labels_b: torch.Tensor, steps: int, k: int,
               stochastic: bool) -> tuple[torch.Tensor, float]:
    """``(x_in, u_in)``: the input of step ``k`` (0-based) of a ``steps``-step sampler of ``model`` from the prior
    draw ``z``, made by the current model itself without gradients (DMD2's backward simulation): each earlier
    step's ``x0_hat`` is re-noised to the next level with fresh noise (``stochastic``) or the noise it implies."""
    conv, fracs = model.convention, timestep_fractions(steps)
    x, b = z, z.shape[0]
    for i in range(k):
        t = conv.time(torch.full((b,), fracs[i], device=z.device))
        x0 = model(x, t, labels_b)
        eps = torch.randn_like(x0) if stochastic else conv.eps_from(x, t, x0)
        x = conv.renoise(x0, conv.time(torch.full((b,), fracs[i + 1], device=z.device)), eps)
    return x, fracs[k]


class ClassifierHead(nn.Module):
    """DMD2's discriminator on the critic: ``[scaled x_t, critic x0_hat, class embedding] -> width -> 1`` logit.

    Any :class:`Denoiser` critic works: its features are its network input and its clean-sample prediction at
    the noised point (not an inner bottleneck, which only some kinds have), so the head's loss trains the critic
    through its prediction as DMD2's trains the critic's encoder."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__()
        size = 1
        for s in sample_shape:
            size *= int(s)
        self.classes = nn.Embedding(num_classes + 1, 16)
        self.net = nn.Sequential(nn.Linear(2 * size + 16, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x_in: torch.Tensor, x0_hat: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """``[B]`` logits (positive: real)."""
        feats = torch.cat([x_in.flatten(1), x0_hat.flatten(1), self.classes(labels_b)], dim=1).float()
        return self.net(feats).squeeze(-1)


def head_logits(critic: Denoiser, head: ClassifierHead, x_t: torch.Tensor, t_b: torch.Tensor,
                labels_b: torch.Tensor) -> torch.Tensor:
    """``[B]`` logits of ``head`` on ``critic``'s features at ``(x_t, t_b)``."""
    x_in, _ = critic.convention.net_input(x_t, t_b)
    return head(x_in, critic(x_t, t_b, labels_b), labels_b)


def gan_generator_loss(fake_logits_b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum softplus(-D(fake)), B)``: DMD2's non-saturating generator term."""
    return F.softplus(-fake_logits_b.float()).sum(), fake_logits_b.shape[0]


def gan_head_loss(fake_logits_b: torch.Tensor, real_logits_b: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum softplus(D(fake)) + softplus(-D(real)), B)``: DMD2's classifier-head loss."""
    return (F.softplus(fake_logits_b.float()) + F.softplus(-real_logits_b.float())).sum(), fake_logits_b.shape[0]


def data_moments(x_n: torch.Tensor, over: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu_tgt, var_tgt)`` of the training samples ``x [N, ...]`` for :func:`~.engine.meanvar_kl`: scalars
    (``sample``: the mean over samples of each sample's mean and variance over its dimensions) or ``[D]`` per
    flattened dimension (``batch``: each dimension's mean and variance over the data)."""
    xf = x_n.double().flatten(1)
    if over == "sample":
        return xf.mean(dim=1).mean().float(), xf.var(dim=1, unbiased=False).mean().float()
    return xf.mean(dim=0).float(), xf.var(dim=0, unbiased=False).float()
