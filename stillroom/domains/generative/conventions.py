"""Time conventions of diffusion and flow models, named and explicit (spec 0.1 item 6).

Papers disagree on what ``t`` means, and a method written for one convention silently does the wrong thing
under another. Every generative model here carries its :class:`Convention`, and every method works in the
*noise fraction* ``u`` in [0, 1] (0: clean data, 1: pure noise), converting with :meth:`Convention.time` and
:meth:`Convention.fraction`:

* ``edm``: ``t`` is the noise level sigma, ``x_t = x0 + sigma * eps``; ``u`` maps to sigma on Karras et al.'s
  rho-schedule between ``sigma_min`` and ``sigma_max`` (``u = 1``: ``sigma_max``). The network is
  preconditioned (``c_in``, ``c_skip``, ``c_out``, ``c_noise`` of EDM).
* ``rf``: rectified flow with ``t = 1`` noise, ``x_t = (1 - t) x0 + t eps``; the network predicts the velocity
  ``eps - x0`` (``t = u``).
* ``flow_clean``: flow with ``t = 1`` clean (Decoupled DMD's paper), ``x_t = t x0 + (1 - t) eps``; the network
  predicts the velocity ``x0 - eps`` (``t = 1 - u``).

Whatever the convention, a model's forward returns the clean-sample prediction ``x0_hat``
(:meth:`Convention.x0_from_output`), and :meth:`Convention.output_weight` makes the x0 regression loss equal
to the loss on the network's raw output (EDM's lambda(sigma), the velocity MSE of flows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

ConventionName = Literal["edm", "rf", "flow_clean"]
CONVENTIONS: tuple[str, ...] = ("edm", "rf", "flow_clean")
_FLOW_EPS = 1e-3
"""Flows' time is kept this far from the data end, where the velocity's x0 factor vanishes."""


@dataclass(frozen=True)
class Convention:
    """One time convention (see the module docstring); the EDM fields are read by ``edm`` only."""

    name: ConventionName = "edm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in CONVENTIONS:
            raise ValueError(f"unknown time convention {self.name!r}; known: {', '.join(CONVENTIONS)}")
        if self.name == "edm" and not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"edm convention: need 0 < sigma_min < sigma_max (got {self.sigma_min}, {self.sigma_max})")

    # ------------------------------------------------------------ time <-> noise fraction
    def time(self, u: torch.Tensor) -> torch.Tensor:
        """Noise fraction ``u`` (any shape, in [0, 1]) -> the convention's time ``t``."""
        if self.name == "edm":
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return (lo + u * (hi - lo)) ** self.rho
        u = u.clamp(_FLOW_EPS, 1.0)
        return u if self.name == "rf" else 1 - u

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`time`: the convention's ``t`` -> noise fraction ``u``."""
        if self.name == "edm":
            lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            return (t ** (1 / self.rho) - lo) / (hi - lo)
        return t if self.name == "rf" else 1 - t

    # ------------------------------------------------------------ noising
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``x_t = a * x0 + b * eps`` at times ``t``."""
        if self.name == "edm":
            return torch.ones_like(t), t
        if self.name == "rf":
            return 1 - t, t
        return t, 1 - t

    def renoise(self, x0: torch.Tensor, t_b: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean samples ``x0 [B, ...]`` at times ``t_b [B]`` with noise ``eps`` (x0's shape)."""
        a, b = (per_sample(c, x0) for c in self.coefficients(t_b))
        return a * x0 + b * eps

    def eps_from(self, x_t: torch.Tensor, t_b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` at ``t_b`` (the inverse of :meth:`renoise` in ``eps``)."""
        a, b = (per_sample(c, x_t) for c in self.coefficients(t_b))
        return (x_t - a * x0) / b

    def prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
        """A draw at ``u = 1`` (pure noise): ``sigma_max * eps`` (edm) or ``eps`` (flows)."""
        eps = torch.randn(shape, generator=generator, device=device)
        return eps * (self.sigma_max if self.name == "edm" else 1.0)

    # ------------------------------------------------------------ network parameterisation
    def net_input(self, x_t: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scaled input, time feature [B])`` the network reads: EDM's ``c_in * x_t`` and ``log(sigma) / 4``;
        flows' ``x_t`` and ``t``."""
        if self.name == "edm":
            c_in = 1 / torch.sqrt(t_b ** 2 + self.sigma_data ** 2)
            return x_t * per_sample(c_in, x_t), torch.log(t_b) / 4
        return x_t, t_b

    def x0_from_output(self, x_t: torch.Tensor, t_b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The clean-sample prediction from the network's raw output ``out`` (x_t's shape)."""
        if self.name == "edm":
            sd2 = self.sigma_data ** 2
            c_skip = sd2 / (t_b ** 2 + sd2)
            c_out = t_b * self.sigma_data / torch.sqrt(t_b ** 2 + sd2)
            return per_sample(c_skip, x_t) * x_t + per_sample(c_out, x_t) * out
        if self.name == "rf":  # out = eps - x0, x_t = x0 + t (eps - x0)
            return x_t - per_sample(t_b, x_t) * out
        return x_t + per_sample(1 - t_b, x_t) * out  # flow_clean: out = x0 - eps, x_t = x0 - (1 - t)(x0 - eps)

    def output_weight(self, t_b: torch.Tensor) -> torch.Tensor:
        """``[B]`` weights w with ``w * ||x0_hat - x0||^2 = ||out - out_target||^2`` (1 / (dx0/dout)^2): EDM's
        lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, ``1 / t^2`` (rf), ``1 / (1 - t)^2``
        (flow_clean)."""
        if self.name == "edm":
            return (t_b ** 2 + self.sigma_data ** 2) / (t_b * self.sigma_data) ** 2
        scale = t_b if self.name == "rf" else 1 - t_b
        return 1 / scale.clamp_min(_FLOW_EPS) ** 2

    def training_times(self, n: int, *, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n]`` times to train a denoiser at: EDM's log-normal sigma (P_mean -1.2, P_std 1.2, clamped to the
        schedule), uniform ``u`` for flows."""
        if self.name == "edm":
            z = torch.randn(n, device=device, generator=generator)
            return torch.exp(-1.2 + 1.2 * z).clamp(self.sigma_min, self.sigma_max)
        return self.time(torch.rand(n, device=device, generator=generator))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "convention") -> "Convention":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown convention fields {sorted(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    def describe(self) -> str:
        if self.name == "edm":
            return f"edm (sigma in [{self.sigma_min:g}, {self.sigma_max:g}], rho {self.rho:g}, sigma_data {self.sigma_data:g})"
        return "rf (t = 1 noise, velocity eps - x0)" if self.name == "rf" else "flow_clean (t = 1 clean, velocity x0 - eps)"


def per_sample(v_b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ...]`` broadcasting against ``like [B, ...]``."""
    return v_b.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def timestep_fractions(steps: int) -> list[float]:
    """The noise fractions a ``steps``-step sampler evaluates the model at: ``1, 1 - 1/steps, ..., 1/steps``."""
    if steps < 1:
        raise ValueError(f"a sampler needs at least 1 step (got {steps})")
    return [1 - i / steps for i in range(steps)]


def sinusoidal(t_b: torch.Tensor, features: int) -> torch.Tensor:
    """``[B] -> [B, features]`` sin/cos embedding of a scalar time feature (frequencies 1 .. 1000, geometric);
    the sign of ``t`` is kept (TwinFlow's negative-time branch)."""
    half = features // 2
    freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=t_b.device))
    angles = t_b.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
