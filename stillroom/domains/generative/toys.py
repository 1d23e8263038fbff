"""Point toys with known densities: class-conditional isotropic Gaussian mixtures (spec 10.6, 11.5).

A :class:`PointMixture` is, for each class ``k``, the mixture ``p(x | k) = sum_m w[k, m] N(x; mu[k, m],
std^2 I)``. Because the density is exact, generated samples can be judged against the truth itself (mode
precision and recall in :mod:`.toy_metrics`), not only against another finite sample.

Toys (:data:`TOYS`):

* ``rings`` (:func:`ring_mixture`): class ``k`` has ``modes`` Gaussians on a circle of radius ``radius``, mode
  ``m`` at angle ``2 pi m / modes + k * rotation``. With ``weights="decreasing"`` mode ``m`` weighs
  ``(modes - m) / (modes (modes + 1) / 2)`` (for 8 modes: 8/36, 7/36, ..., 1/36), the same in every class, so
  a generator that drops the light modes (mode collapse) is visible; ``"uniform"`` gives ``1 / modes``.
* ``moons`` (:func:`moons_mixture`): scikit-learn's two moons as two classes, each arc covered by
  ``modes_per_moon`` equal-weight Gaussians at evenly spaced angles (outer: ``(cos a, sin a)``; inner:
  ``(1 - cos a, 0.5 - sin a)``, ``a`` in ``[0, pi]``), so the density is a finite mixture known exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

_WEIGHT_SUM_TOL = 1e-5


@dataclass(frozen=True, eq=False)
class PointMixture:
    """A class-conditional ``D``-dim Gaussian mixture with shared isotropic ``std``.

    ``means_kmd [K, M, D]`` mode centres; ``weights_km [K, M]`` mode weights (each row sums to 1, a zero weight
    marks an absent mode, so classes may have different mode counts); ``class_names`` has ``K`` entries.
    The parameters are kept float32 on the CPU; methods move them to the inputs' device.
    """

    name: str
    means_kmd: torch.Tensor
    weights_km: torch.Tensor
    std: float
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        k, m = self.weights_km.shape if self.weights_km.dim() == 2 else (-1, -1)
        if self.means_kmd.dim() != 3 or self.means_kmd.shape[:2] != (k, m):
            raise ValueError(f"toy {self.name!r}: means_kmd must be [K, M, D] and weights_km [K, M]; got "
                             f"{list(self.means_kmd.shape)} and {list(self.weights_km.shape)}")
        row_sums_k = self.weights_km.double().sum(1)
        if (self.weights_km < 0).any() or not torch.allclose(row_sums_k, torch.ones_like(row_sums_k),
                                                             atol=_WEIGHT_SUM_TOL):
            raise ValueError(f"toy {self.name!r}: every row of weights_km must be >= 0 and sum to 1; row sums "
                             f"{row_sums_k.tolist()}")
        if not self.std > 0:
            raise ValueError(f"toy {self.name!r}: std must be > 0, got {self.std}")
        if len(self.class_names) != k:
            raise ValueError(f"toy {self.name!r}: {len(self.class_names)} class names for {k} classes")

    @property
    def num_classes(self) -> int:
        return int(self.weights_km.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means_kmd.shape[2])

    def present_modes_km(self) -> torch.Tensor:
        """``[K, M]`` bool: the modes with positive weight."""
        return self.weights_km > 0

    def sample(self, labels_n: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact draws ``[N, D]`` (float32, on ``labels_n``'s device) of ``p(x | labels_n[i])``.

        Mode choice and noise come from ``generator`` only (drawn on its device), so the same generator state
        gives the same points on any device.
        """
        labels_n = self.checked_labels(labels_n)
        gen_device = generator.device
        weights_nm = self.weights_km.to(gen_device)[labels_n.to(gen_device)]
        modes_n = torch.multinomial(weights_nm, 1, generator=generator).squeeze(1)
        noise_nd = torch.randn(len(labels_n), self.dim, generator=generator, device=gen_device)
        means_nd = self.means_kmd.to(gen_device)[labels_n.to(gen_device), modes_n]
        return (means_nd + self.std * noise_nd).to(labels_n.device)

    def log_density(self, x_nd: torch.Tensor, labels_n: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_i | labels_i)`` ``[N]`` (logsumexp over the modes; in ``x_nd``'s float dtype, >= fp32)."""
        labels_n = self.checked_labels(labels_n)
        if x_nd.dim() != 2 or x_nd.shape[1] != self.dim or len(x_nd) != len(labels_n):
            raise ValueError(f"toy {self.name!r}: log_density needs x [N, {self.dim}] and labels [N]; got "
                             f"{list(x_nd.shape)} and {list(labels_n.shape)}")
        dtype = torch.promote_types(x_nd.dtype, torch.float32)
        x_nd = x_nd.to(dtype)
        means_nmd = self.means_kmd.to(x_nd.device, dtype)[labels_n.to(x_nd.device)]
        log_w_nm = self.weights_km.to(x_nd.device, dtype)[labels_n.to(x_nd.device)].log()
        sq_dist_nm = (x_nd[:, None, :] - means_nmd).pow(2).sum(-1)
        log_norm = -0.5 * self.dim * math.log(2 * math.pi * self.std**2)
        return torch.logsumexp(log_w_nm - sq_dist_nm / (2 * self.std**2), dim=1) + log_norm

    def class_log_posterior(self, x_nd: torch.Tensor, std: float | None = None) -> torch.Tensor:
        """``log p(c | x_i)`` ``[N, K]`` under equal class priors, every class's modes at standard deviation ``std``
        (default the toy's own; a wider one is a smoother recognition model, what steering needs far from the
        modes). Differentiable in ``x_nd``."""
        std = self.std if std is None else std
        dtype = torch.promote_types(x_nd.dtype, torch.float32)
        means_kmd = self.means_kmd.to(x_nd.device, dtype)
        sq_nkm = (x_nd.to(dtype)[:, None, None, :] - means_kmd[None]).pow(2).sum(-1)
        log_w_km = self.weights_km.to(x_nd.device, dtype).log()  # an absent mode (weight 0) is -inf
        log_lik_nk = torch.logsumexp(log_w_km[None] - sq_nkm / (2 * std**2), dim=2)
        return log_lik_nk - torch.logsumexp(log_lik_nk, dim=1, keepdim=True)

    def fingerprint(self) -> str:
        """sha256 of the name, class names, std, shapes and parameter values (a cache key for the toy)."""
        h = hashlib.sha256(repr((self.name, self.class_names, float(self.std))).encode())
        for tensor in (self.means_kmd, self.weights_km):
            values = tensor.detach().to("cpu", torch.float64).contiguous()
            h.update(repr(list(values.shape)).encode())
            h.update(values.numpy().tobytes())
        return h.hexdigest()

    def checked_labels(self, labels_n: torch.Tensor) -> torch.Tensor:
        """``labels_n [N]`` as int64 after checking it is 1-D and every label is a class of this toy."""
        if labels_n.dim() != 1 or labels_n.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"toy {self.name!r}: labels must be a 1-D integer tensor, got {labels_n.dtype} "
                             f"{list(labels_n.shape)}")
        if len(labels_n) and (labels_n.min() < 0 or labels_n.max() >= self.num_classes):
            raise ValueError(f"toy {self.name!r}: labels must lie in [0, {self.num_classes}); got "
                             f"[{int(labels_n.min())}, {int(labels_n.max())}]")
        return labels_n.long()


def ring_weights(modes: int, weights: Literal["decreasing", "uniform"]) -> torch.Tensor:
    """``[modes]`` mode weights: ``decreasing`` ``(modes - m) / (modes (modes + 1) / 2)``, or uniform."""
    if weights == "uniform":
        return torch.full((modes,), 1.0 / modes)
    if weights == "decreasing":
        raw = torch.arange(modes, 0, -1, dtype=torch.float64)
        return (raw / raw.sum()).float()
    raise ValueError(f"ring_mixture: weights must be 'decreasing' or 'uniform', got {weights!r}")


def ring_mixture(classes: int = 4, modes: int = 8, radius: float = 1.0, std: float = 0.05,
                 rotation: float = math.pi / 16,
                 weights: Literal["decreasing", "uniform"] = "decreasing") -> PointMixture:
    """Spec 10.6's rings: class ``k``'s ``modes`` Gaussians on a circle of ``radius``, rotated by ``k * rotation``."""
    if classes < 1 or modes < 1:
        raise ValueError(f"ring_mixture: need classes >= 1 and modes >= 1, got {classes}, {modes}")
    angle_km = (2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes)[None, :] \
        + rotation * torch.arange(classes, dtype=torch.float64)[:, None]
    means_kmd = radius * torch.stack([angle_km.cos(), angle_km.sin()], dim=-1)
    weights_km = ring_weights(modes, weights).expand(classes, modes).clone()
    return PointMixture("rings", means_kmd.float(), weights_km, float(std),
                        tuple(f"ring{k}" for k in range(classes)))


def moons_mixture(std: float = 0.05, modes_per_moon: int = 32) -> PointMixture:
    """scikit-learn's two moons (class 0 outer, class 1 inner), each an arc of equal-weight Gaussians."""
    if modes_per_moon < 1:
        raise ValueError(f"moons_mixture: modes_per_moon must be >= 1, got {modes_per_moon}")
    angle_m = torch.linspace(0, math.pi, modes_per_moon, dtype=torch.float64)
    outer_md = torch.stack([angle_m.cos(), angle_m.sin()], dim=-1)
    inner_md = torch.stack([1 - angle_m.cos(), 0.5 - angle_m.sin()], dim=-1)
    weights_km = torch.full((2, modes_per_moon), 1.0 / modes_per_moon)
    return PointMixture("moons", torch.stack([outer_md, inner_md]).float(), weights_km, float(std),
                        ("outer", "inner"))


TOYS: dict[str, Callable[..., PointMixture]] = {"rings": ring_mixture, "moons": moons_mixture}
"""Toy name -> factory (keyword arguments as in the factory)."""
