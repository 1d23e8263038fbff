"""``twinflow``: teacher-free one-step generation with self-adversarial flows (Cheng et al. 2025; spec 13.2).

One network ``F(x_t, t, tt, c)`` (:class:`~stillroom.domains.generative.twinflow_model.TwinFlowDenoiser`,
rf convention: ``x_t = t z + (1 - t) x``, ``v = z - x``, ``x_hat = x_t - |t| F``) is generator, real score and
fake score. Per micro-batch (the loop's global RNG draws every time and noise, so resume is exact):

1. ``t ~ Beta(a, b)``, ``tt = t - u * cor * t``; the batch is cut into equal consecutive groups
   ``e2e`` (``t = 1, tt = 0``: noise to data in one jump), ``mul`` (``tt = t - u' t min(0.05, cor)``: ordinary
   flow matching), ``any`` (the arbitrary jump) and, with ``adversarial``, ``adv``: ``x`` replaced by the
   model's own one-step sample (no grad), queried at ``(-t, -t)``: flow matching of the fake data on the
   negative-time branch;
2. target ``v = z - x``; with ``enhance``, for non-adv rows with ``t`` inside ``enhanced_range``:
   ``v += enr (F_ema(x_t, t, t | c) - F_ema(x_t, t, t | null))`` (guidance baked into the target);
3. the RCGM any-step target (the released code's reference, not a simplification) for every non-adv row:
   roll the EMA model ``N`` sub-steps from ``(x_t - d v, t - d)`` to ``tt`` (displacement ``P``), then
   ``target = sg(F) - clamp((F (t - tt) - P) / d - v, -1, 1)``; where ``t - tt < d`` it is
   ``sg(F) - clamp(F - v, -1, 1)``;
4. ``L_main = mean_b w_b rho(F_b, target_b)``, ``w = tan((1 - (|t| - |tt|)) pi / 2.5) + 1`` (adv: 1), ``rho``
   the Barron-reweighted L2 (:func:`barron_rho`);
5. with ``adversarial``: the e2e samples' ``x_hat`` (detached) re-noised at fresh ``t'' ~ U(0, 1)``,
   ``dv = clamp(F(x'', -t'', -t'') - F(x'', t'', t''), -1, 1)`` (no grad), ``L_rect = mean_e2e rho(F, sg(F -
   dv))``; descending it moves ``x_hat = z - F`` by ``+dv``, from where the fake flow points to where the real
   flow points. ``L = L_main + dist_match_cof * L_rect``;
6. the EMA copy (objective state, checkpointed) is updated after every optimizer step (it starts as the
   model's copy; the decay ramps from 0 toward ``ema_decay`` as in the released code).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stillroom.config.twinflow import TwinFlowConfig
from stillroom.domains.generative.conventions import per_sample
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan

GROUPS_ADV = ("e2e", "mul", "any", "adv")
GROUPS_PLAIN = ("e2e", "mul", "any")


def barron_rho(pred: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """``[B]`` Barron-reweighted L2 of ``pred`` vs ``target`` (``[B, ...]``): ``mse * sg((mse / c^2 / |alpha - 2| +
    1)^((alpha - 2) / 2)) / c`` with ``mse`` the per-sample mean squared error (alpha = 1: about ``sqrt(mse)`` for
    ``mse >> c^2``, a robust loss whose gradient is the MSE's reweighted per sample)."""
    mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)
    if abs(alpha - 2.0) < 1e-5:
        return mse / c
    weight = (mse.detach() / c ** 2 / abs(alpha - 2.0) + 1.0) ** ((alpha - 2.0) / 2.0)
    return mse * weight / c


def time_weights(t_b: torch.Tensor, tt_b: torch.Tensor, adv_b: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``tan((1 - (|t| - |tt|)) pi / 2.5) + 1``, 1 on the adv rows: 1 for a full jump (e2e), ~4.08 for
    instantaneous flow matching."""
    w = torch.tan((1 - (t_b.abs() - tt_b.abs())) * math.pi / 2.5) + 1
    return torch.where(adv_b, torch.ones_like(w), w)


def group_masks(b: int, names: tuple[str, ...], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{name: [b] bool}``: ``b`` rows cut into ``len(names)`` consecutive groups of ``round(b / n)`` (the last
    takes the rest), as the released code does."""
    sizes = [int(round(b / len(names)))] * (len(names) - 1)
    sizes.append(b - sum(sizes))
    if min(sizes) <= 0:
        raise ValueError(f"twinflow: a micro-batch of {b} cannot be cut into groups {names}; raise "
                         f"train.micro_batch_size to at least {len(names)}")
    masks, start = {}, 0
    for name, size in zip(names, sizes):
        m = torch.zeros(b, dtype=torch.bool, device=device)
        m[start:start + size] = True
        masks[name] = m
        start += size
    return masks


def rectification_direction(model: nn.Module, x_hat: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """``dv [B, D]`` = clamp(F(x'', -t'', -t'') - F(x'', t'', t''), -1, 1) at ``x''`` = the one-step samples
    ``x_hat`` re-noised with fresh noise at ``t'' ~ U(0, 1)`` (no grad)."""
    with torch.no_grad():
        t = torch.rand(x_hat.shape[0], device=x_hat.device)
        x_t = per_sample(t, x_hat) * torch.randn_like(x_hat) + per_sample(1 - t, x_hat) * x_hat
        fake = model.velocity(x_t, -t, -t, labels_b)
        real = model.velocity(x_t, t, t, labels_b)
        return (fake - real).float().clamp(-1.0, 1.0)


def multi_jump(model: nn.Module, x_t: torch.Tensor, t_b: torch.Tensor, tt_b: torch.Tensor, labels_b: torch.Tensor,
               order: int) -> torch.Tensor:
    """``[B, D]`` displacement ``sum_i F(x_i, t_i, t_{i+1}) (t_i - t_{i+1})`` of ``order`` equal sub-jumps from
    ``t_b`` to ``tt_b`` (each lands on ``t' z_hat + (1 - t') x_hat``)."""
    pred = torch.zeros_like(x_t)
    times = [t_b * (1 - i / order) + tt_b * (i / order) for i in range(order + 1)]
    for t_c, t_n in zip(times[:-1], times[1:]):
        x_hat, z_hat, f = model.jump(x_t, t_c, t_n, labels_b)
        x_t = per_sample(t_n, x_t) * z_hat + per_sample(1 - t_n, x_t) * x_hat
        pred = pred + f * per_sample(t_c - t_n, f)
    return pred


def rcgm_target(ema: nn.Module, f_det: torch.Tensor, v: torch.Tensor, x_t: torch.Tensor, t_b: torch.Tensor,
                tt_b: torch.Tensor, labels_b: torch.Tensor, order: int, delta: float) -> torch.Tensor:
    """``[B, D]`` RCGM's any-step target (see the module docstring, item 3) for rows with ``t >= tt >= 0``."""
    with torch.no_grad():
        t_m = torch.maximum(t_b - delta, tt_b)
        pred = multi_jump(ema, x_t - delta * v, t_m, tt_b, labels_b, order)
        close = per_sample(t_b < tt_b + delta, v).bool()
        residual = (f_det * per_sample(t_b - tt_b, v) - pred) / delta - v
        correction = torch.where(close, f_det - v, residual)
        return f_det - correction.clamp(-1.0, 1.0)


class TwinFlowForward(nn.Module):
    """``batch -> {"f", "x_t", "t", "tt", "labels", "v", masks...}``: the groups' inputs (no grad) and the one
    forward with gradients, ``F(x_t, t, tt, c)`` (see the module docstring, item 1)."""

    def __init__(self, model: nn.Module, sec: TwinFlowConfig, cond_dropout: float):
        super().__init__()
        self.model, self.sec, self.cond_dropout = model, sec, cond_dropout

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        inputs = self.inputs(batch)
        inputs["f"] = self.model.velocity(inputs["x_t"], inputs["t"], inputs["tt"], inputs["labels"])
        return inputs

    @torch.no_grad()
    def inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        from stillroom.domains.generative.engine import drop_labels

        sec, model = self.sec, self.model
        x, b, dev = batch.x.clone(), batch.x.shape[0], batch.x.device
        labels = drop_labels(batch.labels, model.null_label, self.cond_dropout)
        masks = group_masks(b, GROUPS_ADV if sec.adversarial else GROUPS_PLAIN, dev)
        beta = torch.distributions.Beta(torch.tensor(float(sec.time_beta[0]), device=dev),
                                        torch.tensor(float(sec.time_beta[1]), device=dev))
        t = beta.sample((b,)).clamp(0, 1)
        tt = t - torch.rand(b, device=dev) * sec.consistency_ratio * t
        t_min = t - torch.rand(b, device=dev) * t * min(0.05, sec.consistency_ratio)
        t[masks["e2e"]], tt[masks["e2e"]] = 1.0, 0.0
        tt[masks["mul"]] = t_min[masks["mul"]]
        adv = masks.get("adv", torch.zeros(b, dtype=torch.bool, device=dev))
        if adv.any():
            n = int(adv.sum())
            ones = torch.ones(n, device=dev)
            x[adv] = model.jump(torch.randn_like(x[adv]), ones, torch.zeros_like(ones), labels[adv])[0].to(x.dtype)
            tt[adv] = -t[adv]
        z = torch.randn_like(x)
        x_t = per_sample(t, x) * z + per_sample(1 - t, x) * x
        t = torch.where(adv, -t, t)
        return {"x_t": x_t, "t": t, "tt": tt, "labels": labels, "v": z - x, "adv": adv, "e2e": masks["e2e"]}


class EmaState(nn.Module):
    """The objective's checkpointed state: the EMA copy ``ema`` and its current ``decay`` (ramping from 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("decay", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, model: nn.Module, target_decay: float) -> None:
        """``decay += (1 - decay)(target - decay) / 2``, then ``ema <- decay * ema + (1 - decay) * model``: the
        released schedule, whose EMA at step k (taken before step k's update) is this one after step k - 1."""
        d = float(self.decay)
        d = d + (1 - d) * (target_decay - d) * 0.5
        self.decay.fill_(d)
        for e, p in zip(self.ema.parameters(), model.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)


@dataclass
class TwinFlowObjective:
    """TwinFlow's loss on one micro-batch (see the module docstring); no teacher."""

    forward: TwinFlowForward
    sec: TwinFlowConfig

    def __post_init__(self) -> None:
        self._state = EmaState(self.forward.model)

    @property
    def state(self) -> nn.Module:
        return self._state

    def signal(self, batch: Any) -> Any:
        return None

    def targets(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, D]`` targets: ``v``, enhanced, then RCGM's on the non-adv rows (items 2 and 3)."""
        sec, ema, model = self.sec, self._state.ema, self.forward.model
        target = out["v"].clone()
        real = ~out["adv"]
        x_t, t, tt, labels = (out[k][real] for k in ("x_t", "t", "tt", "labels"))
        v = target[real]
        with torch.no_grad():
            if sec.enhance and sec.enhanced_ratio > 0:
                inside = ((t > sec.enhanced_range[0]) & (t < sec.enhanced_range[1]))[:, None]
                cond = ema.velocity(x_t, t, t, labels)
                uncond = ema.velocity(x_t, t, t, torch.full_like(labels, model.null_label))
                v = torch.where(inside, v + sec.enhanced_ratio * (cond - uncond), v)
            target[real] = rcgm_target(ema, out["f"][real].detach(), v, x_t, t, tt, labels, sec.estimate_order,
                                       sec.rcgm_delta).to(target.dtype)
        return target

    def loss(self, out: dict, batch: Any, signal: Any) -> LossResult:
        sec, f = self.sec, out["f"]
        b = f.shape[0]
        rho = barron_rho(f, self.targets(out), sec.barron_alpha, sec.barron_c)
        main = (rho * time_weights(out["t"], out["tt"], out["adv"])).sum()
        total, parts = main, {"twinflow_main": float(main.detach())}
        e2e = out["e2e"]
        if sec.adversarial and sec.dist_match_cof > 0:
            f_e2e = f[e2e]
            x_hat = (out["x_t"][e2e] - per_sample(out["t"][e2e].abs(), f_e2e) * f_e2e).detach()
            dv = rectification_direction(self.forward.model, x_hat, out["labels"][e2e])
            rect = barron_rho(f_e2e, (f_e2e - dv).detach(), sec.barron_alpha, sec.barron_c).sum()
            rect = sec.dist_match_cof * rect * (b / int(e2e.sum()))  # its mean over e2e rows, as a sum over b
            total = total + rect
            parts["twinflow_rect"] = float(rect.detach())
        return LossResult(total=total, count=b, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self._state.update(self.forward.model, self.sec.ema_decay)

    def metrics(self) -> dict[str, float]:
        return {"ema_decay": float(self._state.decay)}


def build(ctx: MethodContext) -> MethodPlan:
    from stillroom.domains.generative.twinflow_model import TwinFlowDenoiser
    from stillroom.train.loop import Player

    cfg = ctx.cfg
    if not isinstance(ctx.model, TwinFlowDenoiser):
        raise ValueError(f"method=twinflow trains a twinflow network; the student is a {getattr(ctx.model, 'kind', '?')!r}"
                         " denoiser: set generative.student.arch.kind: twinflow (with student.init: teacher), or give "
                         "generative.student.path a twinflow folder")
    teacher = ctx.teacher_model
    if teacher is not None and teacher.convention.name != "rf":
        raise ValueError(f"method=twinflow: the teacher (generative.teacher.path) has convention "
                         f"{teacher.convention.name!r}; TwinFlow starts from a rectified-flow model (rf)")

    def players(student: Player) -> list[Player]:
        forward = TwinFlowForward(ctx.model, cfg.twinflow, cfg.generative.teacher.cond_dropout)
        return [Player(student.name, ctx.model, TwinFlowObjective(forward, cfg.twinflow))]

    return MethodPlan(players=players)


METHOD = Method("twinflow", build=build, domains=("generative",))
