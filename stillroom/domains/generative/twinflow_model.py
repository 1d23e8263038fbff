"""TwinFlow's any-step network (spec 13.2): one MLP that is generator, real score and fake score.

``F(x_t, t, tt, c)`` predicts the rectified-flow velocity ``z - x`` (``rf`` convention: ``t = 1`` noise,
``x_t = t z + (1 - t) x``) of a jump from the current time ``t`` to the target time ``tt``; ``tt = t`` is the
instantaneous flow, ``tt = 0`` one jump to data. The *sign* of ``t`` marks the branch: ``t > 0`` the flow of
the real data, ``t < 0`` the flow of the model's own one-step samples (the fake branch). The sinusoidal
embedding (:func:`~.conventions.sinusoidal`) keeps the sign (``sin`` flips, ``cos`` does not).

As a :class:`~.denoiser.Denoiser`, ``forward(x_t, t_b, labels_b)`` is the clean-sample prediction of one jump
to data, ``x_t - t F(x_t, t, 0, c)``, so the domain's samplers, evaluation and report use it unchanged; the
method reads :meth:`TwinFlowDenoiser.velocity` with any ``(t, tt)``.

Architecture: the :class:`~.models.MlpDenoiser`'s layers with the same names and shapes (``class_table``,
``body``, ``head``) plus ``tt_proj``, a bias-free linear map of the ``tt`` embedding added to the first
layer's pre-activation. :meth:`TwinFlowDenoiser.from_teacher` copies a stage-0 MLP flow model into it and
leaves ``tt_proj`` at zero, so the copy starts *equal* to the teacher at every ``tt`` (the teacher's
velocity is the instantaneous one, the right start for ``tt`` near ``t``; training moves the rest).
"""

from __future__ import annotations

import torch
from torch import nn

from stillroom.domains.generative.conventions import Convention, per_sample, sinusoidal
from stillroom.domains.generative.denoiser import Denoiser, MlpDenoiser



class TwinFlowDenoiser(MlpDenoiser):
    """``[B, D]`` points: ``[x_t, sin/cos(t), class] -> Linear (+ tt_proj(sin/cos(tt))) -> SiLU -> ... -> D``."""

    kind = "twinflow"

    def __init__(self, *, dim: int, num_classes: int, convention: Convention, width: int = 128, depth: int = 4,
                 time_features: int = 32, class_features: int = 32):
        if convention.name != "rf":
            raise ValueError(f"a twinflow network predicts rf velocities (t = 1 noise); got convention "
                             f"{convention.name!r}: train its teacher with generative.teacher.convention.name: rf")
        super().__init__(dim=dim, num_classes=num_classes, convention=convention, width=width, depth=depth,
                         time_features=time_features, class_features=class_features)
        self.tt_proj = nn.Linear(time_features, width, bias=False)

    def velocity(self, x_t: torch.Tensor, t_b: torch.Tensor, tt_b: torch.Tensor,
                 labels_b: torch.Tensor) -> torch.Tensor:
        """``F [B, D]`` at points ``x_t [B, D]``, signed times ``t_b [B]`` in [-1, 1], target times ``tt_b [B]``
        and labels ``labels_b [B]`` (``num_classes``: the null label)."""
        features = torch.cat([x_t, sinusoidal(t_b, self.time_features).to(x_t.dtype),
                              self.class_table(labels_b).to(x_t.dtype)], dim=-1)
        hidden = self.body[0](features) + self.tt_proj(sinusoidal(tt_b, self.time_features).to(x_t.dtype))
        for layer in self.body[1:]:
            hidden = layer(hidden)
        return self.head(hidden)

    def raw(self, x_in: torch.Tensor, time_b: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
        """The velocity of one jump to data (``tt = 0``): what :meth:`Denoiser.forward` turns into ``x0_hat``."""
        return self.velocity(x_in, time_b, torch.zeros_like(time_b), labels_b)

    def jump(self, x_t: torch.Tensor, t_b: torch.Tensor, tt_b: torch.Tensor,
             labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_hat, z_hat, F)``: ``x_hat = x_t - |t| F`` (the data end), ``z_hat = x_t + (1 - |t|) F`` (the noise
        end), all ``[B, D]``; the sign of ``t_b`` picks the branch, its magnitude the noise level."""
        v = self.velocity(x_t, t_b, tt_b, labels_b)
        t = per_sample(t_b.abs(), x_t)
        return x_t - t * v, x_t + (1 - t) * v, v

    @classmethod
    def from_teacher(cls, teacher: Denoiser, where: str = "generative.teacher") -> "TwinFlowDenoiser":
        """A twinflow network with ``teacher``'s (an ``mlp`` rf flow model) weights and ``tt_proj = 0``, so it
        computes the teacher's velocity at every ``tt``; refused (naming ``where``) for another kind or
        convention."""
        if teacher.convention.name != "rf":
            raise ValueError(f"{where}: TwinFlow starts from a rectified-flow model (t = 1 noise); the teacher's "
                             f"convention is {teacher.convention.name!r}: set {where}.convention.name: rf")
        if teacher.kind != "mlp":
            raise ValueError(f"{where}: a twinflow student copies an mlp flow model; the teacher is a "
                             f"{teacher.kind!r} denoiser: set {where}.arch.kind: mlp")
        model = cls.from_json(teacher.arch_json(), teacher.num_classes, teacher.convention)
        missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or set(missing) != {"tt_proj.weight"}:
            raise ValueError(f"{where}: the teacher's weights do not fit a twinflow network (missing {missing}, "
                             f"unexpected {unexpected})")
        nn.init.zeros_(model.tt_proj.weight)
        return model.to(next(teacher.parameters()).device)
