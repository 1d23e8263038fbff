"""Metrics of toy generative experiments (spec 0.1 item 8): sample-set distances, mode coverage, exact TV.

All functions are pure, torch only, run on the inputs' device and are deterministic (random projections come
from an explicit seed). Sample sets are ``[N, ...]`` tensors flattened to ``[N, D]`` points.

* :func:`sliced_wasserstein` (SWD-2): ``sqrt(mean_p W2(x . theta_p, y . theta_p)^2)`` over ``projections``
  random unit directions ``theta_p``; each 1-D W2 compares the two quantile functions at the midpoint levels
  ``(i + 0.5) / L``, ``L = max(N, M)``, interpolating linearly between order statistics (for ``N = M`` this is
  exactly the sorted matching). A 2-D shift ``s`` gives ``|s| sqrt(E[cos^2]) = |s| / sqrt(2)``.
* :func:`rbf_mmd2`: unbiased MMD^2 with the kernel ``k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))`` over the
  bandwidths ``h``, computed in row chunks (float64) so 20k x 20k sets fit in memory.
* :func:`mode_precision` / :func:`mode_recall`: against a :class:`~.toys.PointMixture`'s exact modes; a sample
  *hits* its class's nearest present mode when it lies within ``k_std * std`` of it.
* :func:`exact_tv`, :func:`joint_counts`, :func:`pair_tv`: total variation between empirical counts and an
  exact distribution over a small finite outcome space (token sequences of length ``L`` over ``vocab``
  symbols are indexed row-major, the order of ``probs_joint.reshape(-1)`` for ``probs_joint [vocab] * L``).
* :func:`output_variance`: mean per-dimension variance, the collapse indicator of DMD-style generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from stillroom.domains.generative.toys import PointMixture

MMD_CHUNK_ELEMENTS = 1 << 22
"""Pairwise kernel entries computed at once by :func:`rbf_mmd2` (about 32 MiB of float64)."""
MAX_JOINT_OUTCOMES = 1 << 24
"""Largest ``vocab ** L`` :func:`joint_counts` accepts (a dense count vector of that size)."""
_PROB_SUM_TOL = 1e-4


def _as_points(x: torch.Tensor, what: str, min_rows: int = 1) -> torch.Tensor:
    """``x [N, ...]`` -> ``[N, D]`` (trailing dims flattened), checking it has at least ``min_rows`` rows."""
    if x.dim() < 1 or len(x) < min_rows:
        raise ValueError(f"{what}: need at least {min_rows} samples, got shape {list(x.shape)}")
    return x.reshape(len(x), -1)


def _same_dim(x_nd: torch.Tensor, y_md: torch.Tensor, what: str) -> None:
    if x_nd.shape[1] != y_md.shape[1]:
        raise ValueError(f"{what}: the two sample sets have different dimensions {x_nd.shape[1]} and {y_md.shape[1]}")


# ------------------------------------------------------------------ sample-set distances
def random_directions(count: int, dim: int, *, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[count, dim]`` unit vectors, uniform on the sphere, drawn on the CPU from ``seed`` (device-independent)."""
    gen = torch.Generator().manual_seed(seed)
    dirs_pd = torch.randn(count, dim, generator=gen, dtype=torch.float64)
    return (dirs_pd / dirs_pd.norm(dim=1, keepdim=True)).to(device)


def quantiles_at(sorted_np: torch.Tensor, levels_l: torch.Tensor) -> torch.Tensor:
    """Quantile function of each column of ``sorted_np [N, P]`` (ascending) at ``levels_l [L]`` in (0, 1) -> ``[L, P]``.

    Order statistic ``i`` sits at level ``(i + 0.5) / N``; in between, linear interpolation; beyond, the extremes.
    """
    n = len(sorted_np)
    pos_l = (levels_l * n - 0.5).clamp(0, n - 1)
    lo_l = pos_l.floor().long()
    hi_l = (lo_l + 1).clamp(max=n - 1)
    frac_l1 = (pos_l - lo_l)[:, None].to(sorted_np.dtype)
    return sorted_np[lo_l] * (1 - frac_l1) + sorted_np[hi_l] * frac_l1


def sliced_wasserstein(x_nd: torch.Tensor, y_md: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """SWD-2 between sample sets ``x [N, ...]`` and ``y [M, ...]`` (see the module docstring); N may differ from M."""
    x_nd, y_md = _as_points(x_nd, "sliced_wasserstein x"), _as_points(y_md, "sliced_wasserstein y")
    _same_dim(x_nd, y_md, "sliced_wasserstein")
    if projections < 1:
        raise ValueError(f"sliced_wasserstein: projections must be >= 1, got {projections}")
    dirs_pd = random_directions(projections, x_nd.shape[1], seed=seed, device=x_nd.device)
    x_np = (x_nd.double() @ dirs_pd.T).sort(dim=0).values
    y_mp = (y_md.to(x_nd.device).double() @ dirs_pd.T).sort(dim=0).values
    if len(x_np) == len(y_mp):
        sq_gap = (x_np - y_mp).pow(2).mean()
    else:
        count = max(len(x_np), len(y_mp))
        levels_l = (torch.arange(count, device=x_nd.device, dtype=torch.float64) + 0.5) / count
        sq_gap = (quantiles_at(x_np, levels_l) - quantiles_at(y_mp, levels_l)).pow(2).mean()
    return float(sq_gap.sqrt())


def _block_kernel_sum(a_cd: torch.Tensor, b_md: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """``sum_{i, j} sum_s exp(-s ||a_i - b_j||^2)`` (float64 scalar) for one block of rows ``a [C, D]``.

    Squared distances in float64 (no cancellation on the diagonal), the exponentials in float32 in place (the
    costly part, about 3x faster than float64), summed in float64.
    """
    sq_dist_cm = torch.addmm(a_cd.pow(2).sum(1)[:, None] + b_md.pow(2).sum(1)[None, :], a_cd, b_md.T, alpha=-2)
    sq_dist_cm = sq_dist_cm.clamp_min_(0).float()
    kernel_cm = torch.empty_like(sq_dist_cm)
    total = torch.zeros((), dtype=torch.float64, device=a_cd.device)
    for scale in scales:
        torch.mul(sq_dist_cm, -scale, out=kernel_cm)
        total += kernel_cm.exp_().sum(dtype=torch.float64)
    return total


def _rows_per_chunk(columns: int) -> int:
    return max(1, MMD_CHUNK_ELEMENTS // max(1, columns))


def _cross_kernel_sum(a_nd: torch.Tensor, b_md: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """``sum_{i, j} k(a_i, b_j)`` over all ``N x M`` pairs, in row chunks."""
    rows = _rows_per_chunk(len(b_md))
    return sum(_block_kernel_sum(a_nd[i : i + rows], b_md, scales) for i in range(0, len(a_nd), rows))


def _self_kernel_sum(a_nd: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """``sum_{i, j} k(a_i, a_j)`` (diagonal included) from the upper block triangle: each row chunk's square block
    plus twice its block right of the diagonal (the kernel is symmetric), about half the work of the full sum."""
    rows, total = _rows_per_chunk(len(a_nd)), torch.zeros((), dtype=torch.float64, device=a_nd.device)
    for start in range(0, len(a_nd), rows):
        block_cd, right_rd = a_nd[start : start + rows], a_nd[start + rows :]
        total += _block_kernel_sum(block_cd, block_cd, scales)
        if len(right_rd):
            total += 2 * _block_kernel_sum(block_cd, right_rd, scales)
    return total


def rbf_mmd2(x_nd: torch.Tensor, y_md: torch.Tensor, *,
             bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0)) -> float:
    """Unbiased MMD^2 (may be slightly negative) between ``x [N, ...]`` and ``y [M, ...]``, N, M >= 2.

    ``MMD^2 = sum_{i != j} k(x_i, x_j) / (N (N-1)) + sum_{i != j} k(y_i, y_j) / (M (M-1)) - 2 sum k(x_i, y_j) / (N M)``;
    the diagonal of each within-set sum is exactly ``len(bandwidths)`` per sample (``k(a, a)``) and is subtracted.
    """
    x_nd = _as_points(x_nd, "rbf_mmd2 x", min_rows=2).double()
    y_md = _as_points(y_md, "rbf_mmd2 y", min_rows=2).to(x_nd.device).double()
    _same_dim(x_nd, y_md, "rbf_mmd2")
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"rbf_mmd2: bandwidths must be positive and non-empty, got {list(bandwidths)}")
    scales = [1.0 / (2 * h * h) for h in bandwidths]
    n, m, diag = len(x_nd), len(y_md), float(len(bandwidths))
    xx = (_self_kernel_sum(x_nd, scales) - n * diag) / (n * (n - 1))
    yy = (_self_kernel_sum(y_md, scales) - m * diag) / (m * (m - 1))
    xy = _cross_kernel_sum(x_nd, y_md, scales) / (n * m)
    return float(xx + yy - 2 * xy)


# ------------------------------------------------------------------ modes of a known mixture
def nearest_mode(x_nd: torch.Tensor, labels_n: torch.Tensor,
                 mixture: PointMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mode_n, distance_n)``: each sample's nearest present mode of its own class and the distance to it."""
    if x_nd.dim() != 2 or x_nd.shape[1] != mixture.dim or len(x_nd) != len(labels_n) or len(x_nd) == 0:
        raise ValueError(f"{mixture.name} modes: need x [N >= 1, {mixture.dim}] and labels [N]; got "
                         f"{list(x_nd.shape)} and {list(labels_n.shape)}")
    labels_n = mixture.checked_labels(labels_n).to(x_nd.device)
    means_nmd = mixture.means_kmd.to(x_nd.device, torch.float64)[labels_n]
    present_nm = mixture.present_modes_km().to(x_nd.device)[labels_n]
    dist_nm = (x_nd.double()[:, None, :] - means_nmd).norm(dim=-1).masked_fill(~present_nm, math.inf)
    distance_n, mode_n = dist_nm.min(dim=1)
    return mode_n, distance_n


def mode_precision(x_nd: torch.Tensor, labels_n: torch.Tensor, mixture: PointMixture, *, k_std: float = 3.0) -> float:
    """Fraction of samples ``x [N, D]`` within ``k_std * std`` of a present mode of their class ``labels [N]``.

    For exact samples of the mixture in 2-D with well separated modes this is ``1 - exp(-k_std^2 / 2)``
    (0.989 at ``k_std = 3``): the chi-square(2) mass inside the radius.
    """
    _, distance_n = nearest_mode(x_nd, labels_n, mixture)
    return float((distance_n <= k_std * mixture.std).double().mean())


def mode_recall(x_nd: torch.Tensor, labels_n: torch.Tensor, mixture: PointMixture, *, min_fraction: float = 0.01,
                k_std: float = 3.0) -> float:
    """Fraction of the mixture's present (class, mode) pairs hit by ``>= min_fraction`` of that class's samples.

    A sample counts toward its nearest present mode of its own class only when within ``k_std * std`` of it. The
    denominator is every present pair of every class, so a class without samples counts as uncovered.
    """
    mode_n, distance_n = nearest_mode(x_nd, labels_n, mixture)
    labels_n = labels_n.to(x_nd.device).long()
    k, m = mixture.weights_km.shape
    hit_n = distance_n <= k_std * mixture.std
    hits_km = torch.bincount(labels_n[hit_n] * m + mode_n[hit_n], minlength=k * m).reshape(k, m)
    per_class_k = torch.bincount(labels_n, minlength=k)
    covered_km = (hits_km >= min_fraction * per_class_k[:, None]) & (hits_km > 0)
    present_km = mixture.present_modes_km().to(x_nd.device)
    return float((covered_km & present_km).sum() / present_km.sum())


# ------------------------------------------------------------------ exact TV on finite outcome spaces
def _dense_counts(counts: torch.Tensor | Mapping, probs: torch.Tensor) -> torch.Tensor:
    """``counts`` (a tensor shaped like ``probs`` or flat, or a mapping outcome -> count, the outcome an int flat
    index or a tuple index into ``probs``) -> flat float64 ``[probs.numel()]``."""
    if isinstance(counts, Mapping):
        dense = torch.zeros(probs.shape, dtype=torch.float64)
        flat = dense.view(-1)
        for outcome, count in counts.items():
            try:
                if isinstance(outcome, int):
                    flat[outcome] += count
                else:
                    dense[tuple(outcome)] += count
            except IndexError as err:
                raise ValueError(f"exact_tv: outcome {outcome!r} is outside probs of shape "
                                 f"{list(probs.shape)}") from err
        return dense.reshape(-1).to(probs.device)
    if counts.numel() != probs.numel():
        raise ValueError(f"exact_tv: counts has {counts.numel()} outcomes, probs {probs.numel()}")
    return counts.reshape(-1).to(probs.device, torch.float64)


def exact_tv(counts: torch.Tensor | Mapping, probs: torch.Tensor) -> float:
    """``0.5 * sum_o |counts_o / sum(counts) - probs_o|`` over the finite outcome space of ``probs`` (any shape)."""
    probs_o = probs.reshape(-1).double()
    if (probs_o < 0).any() or abs(float(probs_o.sum()) - 1) > _PROB_SUM_TOL:
        raise ValueError(f"exact_tv: probs must be >= 0 and sum to 1 (sum {float(probs_o.sum()):.6f})")
    counts_o = _dense_counts(counts, probs)
    if (counts_o < 0).any() or counts_o.sum() <= 0:
        raise ValueError("exact_tv: counts must be >= 0 with a positive total")
    return float(0.5 * (counts_o / counts_o.sum() - probs_o).abs().sum())


def _check_tokens(tokens_nl: torch.Tensor, vocab: int, what: str) -> None:
    if tokens_nl.dim() != 2 or tokens_nl.dtype not in (torch.int64, torch.int32) or len(tokens_nl) == 0:
        raise ValueError(f"{what}: tokens must be a non-empty [N, L] integer tensor, got {tokens_nl.dtype} "
                         f"{list(tokens_nl.shape)}")
    if tokens_nl.min() < 0 or tokens_nl.max() >= vocab:
        raise ValueError(f"{what}: tokens must lie in [0, {vocab}); got "
                         f"[{int(tokens_nl.min())}, {int(tokens_nl.max())}]")


def joint_counts(tokens_nl: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[vocab ** L]`` int64 counts of the sequences ``tokens [N, L]`` (row-major index: first position slowest)."""
    _check_tokens(tokens_nl, vocab, "joint_counts")
    length = tokens_nl.shape[1]
    if vocab**length > MAX_JOINT_OUTCOMES:
        raise ValueError(f"joint_counts: vocab ** L = {vocab}**{length} outcomes exceeds {MAX_JOINT_OUTCOMES}; "
                         "use pair_tv for marginals of long sequences")
    place_l = vocab ** torch.arange(length - 1, -1, -1, device=tokens_nl.device)
    return torch.bincount((tokens_nl.long() * place_l).sum(1), minlength=vocab**length)


def pair_tv(tokens_nl: torch.Tensor, probs_joint: torch.Tensor, i: int, j: int, vocab: int) -> float:
    """TV between the empirical and exact joint of positions ``(i, j)``, ``i != j``.

    ``probs_joint``: the exact joint over ``L`` positions, ``[vocab] * L`` or flat ``[vocab ** L]`` (row-major);
    its ``(i, j)`` marginal ``[vocab, vocab]`` is compared with the counts of ``(tokens[:, i], tokens[:, j])``.
    """
    _check_tokens(tokens_nl, vocab, "pair_tv")
    length = tokens_nl.shape[1]
    if i == j or not (0 <= i < length and 0 <= j < length):
        raise ValueError(f"pair_tv: need two different positions in [0, {length}), got ({i}, {j})")
    if probs_joint.numel() != vocab**length:
        raise ValueError(f"pair_tv: probs_joint has {probs_joint.numel()} entries, expected "
                         f"vocab ** L = {vocab**length}")
    probs = probs_joint.reshape([vocab] * length).double()
    marginal_vv = probs.sum(dim=[d for d in range(length) if d not in (i, j)]) if length > 2 else probs
    if i > j:
        marginal_vv = marginal_vv.T
    pair_counts = torch.bincount(tokens_nl[:, i].long() * vocab + tokens_nl[:, j].long(), minlength=vocab * vocab)
    return exact_tv(pair_counts, marginal_vv.to(tokens_nl.device))


# ------------------------------------------------------------------ spread and per-class helpers
def output_variance(x_nd: torch.Tensor) -> float:
    """Mean over dimensions of the unbiased per-dimension variance of ``x [N, ...]`` (N >= 2)."""
    return float(_as_points(x_nd, "output_variance", min_rows=2).double().var(dim=0).mean())


def per_class(metric: Callable[..., float], x: torch.Tensor, labels: torch.Tensor, y: torch.Tensor,
              y_labels: torch.Tensor, **metric_kwargs) -> dict[int, float]:
    """``{class: metric(x[labels == c], y[y_labels == c], **metric_kwargs)}`` for every class present in ``labels``."""
    if len(x) != len(labels) or len(y) != len(y_labels):
        raise ValueError(f"per_class: {len(x)} samples for {len(labels)} labels, {len(y)} references for "
                         f"{len(y_labels)} labels")
    y_labels = y_labels.to(labels.device)
    out: dict[int, float] = {}
    for cls in labels.unique().tolist():
        ref = y_labels == cls
        if not ref.any():
            raise ValueError(f"per_class: class {cls} has samples but no reference samples")
        out[int(cls)] = metric(x[(labels == cls).to(x.device)], y[ref.to(y.device)], **metric_kwargs)
    return out
