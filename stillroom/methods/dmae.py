"""DMAE (Bai et al., CVPR 2023): feature distillation during MAE pre-training, on the visible patches only.

For every image one random mask is drawn (:func:`stillroom.domains.vision.mae.mask_noise`) and given to
both networks as the same ``noise``, so the student and the frozen MAE teacher keep the same visible
patches. The loss per image is

    L = L_MAE(student) + w * sum_(l, m) mean_(tokens, channels) d( n(P_l(h_s^l)), n(sg(h_t^m)) )

with ``h^l`` block ``l``'s output on the ``1 + V`` visible tokens ([CLS] included), ``P_l`` a projector
(:func:`~stillroom.models.projectors.build_projector`; trained with the student, in the objective's
state), ``n`` L2 normalisation per token (``dmae.normalize``), ``d`` the absolute (``l1``) or squared
(``l2``) difference. The teacher runs truncated after its last aligned block
(:meth:`~stillroom.models.taps.FeatureTap.truncated`: its later blocks and its decoder never run), on
the visible tokens, or on all tokens with the visible ones kept afterwards (``teacher_tokens: all``,
spec ablation C). Aligned blocks default to the same relative depth (``dmae.relative_depth``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.mae import DmaeConfig
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.mae import MaeForward, MaeObjective, unmasked, unmasked_noise
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.models.projectors import build_projector
from stillroom.models.taps import FeatureTap
from stillroom.train.loop import Player


def feature_distance(student_btd: torch.Tensor, teacher_btd: torch.Tensor, *, distance: str,
                     normalize: bool) -> tuple[torch.Tensor, int]:
    """``(sum over images of the mean over tokens and channels of |s - t| (l1) or (s - t)^2 (l2), B)``; with
    ``normalize`` both sides are first divided by their L2 norm per token. ``sum / B`` is ``nn.L1Loss()``'s
    (``nn.MSELoss()``'s) mean when every image has the same number of tokens."""
    s, t = student_btd.float(), teacher_btd.float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    diff = (s - t).abs() if distance == "l1" else (s - t) ** 2
    return diff.flatten(1).mean(1).sum(), s.shape[0]


def visible_tokens(all_tokens_btd: torch.Tensor, noise_bn: torch.Tensor, keep: int) -> torch.Tensor:
    """``[B, 1 + keep, d]``: [CLS] and the ``keep`` patches that ``noise`` leaves visible, in the masked forward's
    order (``argsort(noise)[:keep]``), out of tokens ``[B, 1 + N, d]`` computed on all patches in image order."""
    ids_keep = torch.argsort(noise_bn, dim=1)[:, :keep] + 1
    index = torch.cat([torch.zeros_like(ids_keep[:, :1]), ids_keep], 1)
    return all_tokens_btd.gather(1, index[..., None].expand(-1, -1, all_tokens_btd.shape[-1]))


class DmaeTeacher:
    """The frozen teacher's aligned block outputs ``{m: [B, 1 + V, d_t]}`` on the visible tokens of ``noise``
    (no grad; the forward stops after the last aligned block)."""

    def __init__(self, model: nn.Module, blocks: list[int], tokens: str):
        self.model = model
        self.blocks = sorted(set(blocks))
        self.tokens = tokens
        self.tap = FeatureTap(model, [f"block.{m}" for m in self.blocks])

    @torch.no_grad()
    def features(self, pixels_bchw: torch.Tensor, noise_bn: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.tokens == "visible":
            taps = self.tap.truncated(pixel_values=pixels_bchw, noise=noise_bn)
            return {m: taps[f"block.{m}"].float() for m in self.blocks}
        keep = int(noise_bn.shape[1] * (1 - self.model.config.mask_ratio))
        with unmasked(self.model):
            taps = self.tap.truncated(pixel_values=pixels_bchw,
                                      noise=unmasked_noise(self.model, len(pixels_bchw), pixels_bchw.device))
        return {m: visible_tokens(taps[f"block.{m}"].float(), noise_bn, keep) for m in self.blocks}


@dataclass
class DmaeObjective(MaeObjective):
    """MAE loss + the aligned-feature terms (see the module docstring); the projectors live in the state."""

    teacher: DmaeTeacher | None = None
    pairs: tuple[tuple[int, int], ...] = ()
    settings: DmaeConfig | None = None

    def signal(self, batch: Any) -> dict[int, torch.Tensor]:
        pixels, noise = self.forward.inputs(batch)  # the same shifted images and mask as the student's forward
        return self.teacher.features(pixels, noise)

    def loss(self, outputs: dict, batch: Any, signal: dict[int, torch.Tensor]) -> LossResult:
        total, count = self.mae_part(outputs)
        parts = {"mae": float(total.detach())}
        s = self.settings
        for k, (l, m) in enumerate(self.pairs):
            projected = self.state["projectors"][k](outputs["hidden_states"][l + 1])
            term, _ = feature_distance(projected, signal[m], distance=s.distance, normalize=s.normalize)
            total = total + s.weight * term
            parts[f"feat_{l}_{m}"] = float(term.detach())
        return LossResult(total=total, count=count, parts=parts)


def build_objective(model: nn.Module, teacher: nn.Module, s: DmaeConfig, pairs: list[tuple[int, int]], *, seed: int,
                    shift: int) -> DmaeObjective:
    """The student's DMAE objective: a forward that returns its block outputs, one seeded projector per pair."""
    d_s, d_t = model.config.hidden_size, teacher.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "dmae-projectors"))
        projectors = nn.ModuleList([build_projector(s.projector, d_s, d_t) for _ in pairs])
    forward = MaeForward(model, seed=seed, shift=shift, hidden_states=True)
    return DmaeObjective(forward, extra={"projectors": projectors},
                         teacher=DmaeTeacher(teacher, [m for _, m in pairs], s.teacher_tokens),
                         pairs=tuple(pairs), settings=s)


def _build(ctx: MethodContext) -> MethodPlan:
    from stillroom.domains.vision.mae_domain import dmae_pairs

    cfg, teacher = ctx.cfg, ctx.teacher_model
    pairs = dmae_pairs(cfg.dmae, ctx.model.config.num_hidden_layers, teacher.config.num_hidden_layers)
    ctx.log(f"dmae: aligning (student block, teacher block) {pairs} with a {cfg.dmae.projector} projector, "
            f"{cfg.dmae.distance} on {'normalised ' if cfg.dmae.normalize else ''}features, teacher on "
            f"{cfg.dmae.teacher_tokens} tokens")
    objective = build_objective(ctx.model, teacher, cfg.dmae, pairs, seed=cfg.seed, shift=cfg.mae.shift)

    def players(student: Player) -> list[Player]:
        return [Player(student.name, student.model, objective)]

    return MethodPlan(players=players)


METHOD = Method("dmae", build=_build, domains=("mae",))
