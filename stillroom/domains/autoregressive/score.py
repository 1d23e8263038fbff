"""The analytic conditional score of a categorical teacher (DD2's Eq. 1; spec 12.2, the toolkit's
``CategoricalToScore``).

Sampling token ``i`` from ``p = p_Phi(. | q_<i)`` over codebook vectors ``c_j`` is seen as rectified-flow
transport from N(0, I) to the Dirac mixture ``sum_j p_j delta(c_j)``. Under ``q^t = (1 - t) q + t eps``
(``t = 1`` noise) the noisy token's density is the Gaussian mixture ``sum_j p_j N(x; (1 - t) c_j, t^2 I)``, so

    w_j(x, t) = softmax_j( log p_j - ||x - (1 - t) c_j||^2 / (2 t^2) )       (log-sum-exp softmax: stable)
    s_Phi(x, t) = - sum_j w_j (x - (1 - t) c_j) / t^2 = -(x - (1 - t) mu) / t^2,   mu = sum_j w_j c_j

``mu`` is the posterior mean of the clean token (the teacher's denoiser, "f_real" in SiD's units); the score
and the denoiser carry the same information (:func:`score_from_denoiser`).
"""

from __future__ import annotations

import torch



def _log_probs(probs_nv: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``-inf`` for zero probabilities: a token the teacher never emits gets weight exactly 0, at any
    noise level (each row has some positive probability, so the softmax stays finite)."""
    return probs_nv.log().masked_fill(probs_nv <= 0, float("-inf"))


def posterior_weights(x_nd: torch.Tensor, t_n: torch.Tensor, probs_nv: torch.Tensor,
                      codebook_vd: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` weights ``w_j`` of each codeword for noisy tokens ``x [N, D]`` at times ``t [N]`` given the
    teacher's next-token probabilities ``probs [N, V]`` (rows sum to 1) and ``codebook [V, D]``."""
    shrink_n1 = (1 - t_n)[:, None]
    sq_dist_nv = ((x_nd[:, None, :] - shrink_n1[..., None] * codebook_vd[None]) ** 2).sum(-1)
    logits_nv = _log_probs(probs_nv) - sq_dist_nv / (2 * t_n[:, None] ** 2)
    return torch.softmax(logits_nv, dim=-1)


def teacher_denoiser(x_nd: torch.Tensor, t_n: torch.Tensor, probs_nv: torch.Tensor,
                     codebook_vd: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: the posterior mean ``mu = sum_j w_j c_j`` of the clean token (see the module docstring)."""
    return posterior_weights(x_nd, t_n, probs_nv, codebook_vd) @ codebook_vd.to(x_nd.dtype)


def analytic_score(x_nd: torch.Tensor, t_n: torch.Tensor, probs_nv: torch.Tensor,
                   codebook_vd: torch.Tensor) -> torch.Tensor:
    """``[N, D]``: ``s_Phi(x, t) = -(x - (1 - t) mu) / t^2``, the gradient of the log of the noisy token's density."""
    return score_from_denoiser(x_nd, t_n, teacher_denoiser(x_nd, t_n, probs_nv, codebook_vd))


def score_from_denoiser(x_nd: torch.Tensor, t_n: torch.Tensor, mu_nd: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` score ``-(x - (1 - t) mu) / t^2`` of a denoiser's clean-token prediction ``mu [N, D]``."""
    t_n1 = t_n[:, None].to(x_nd.dtype)
    return -(x_nd - (1 - t_n1) * mu_nd) / t_n1 ** 2


def smoothed_log_density(x_nd: torch.Tensor, t_n: torch.Tensor, probs_nv: torch.Tensor,
                         codebook_vd: torch.Tensor) -> torch.Tensor:
    """``[N]`` log of ``sum_j p_j N(x; (1 - t) c_j, t^2 I)`` (the density whose gradient the score is; used by the
    tests and as documentation of what the score means)."""
    d = x_nd.shape[-1]
    t_n1 = t_n[:, None]
    sq_dist_nv = ((x_nd[:, None, :] - (1 - t_n1)[..., None] * codebook_vd[None]) ** 2).sum(-1)
    log_norm_n1 = -d * torch.log(t_n1) - 0.5 * d * torch.log(torch.tensor(2 * torch.pi, dtype=x_nd.dtype))
    return torch.logsumexp(_log_probs(probs_nv) - sq_dist_nv / (2 * t_n1 ** 2) + log_norm_n1, dim=-1)
