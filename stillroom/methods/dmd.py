"""``dmd``: distribution matching distillation (DMD, DMD2, Decoupled DMD; spec section 10; docs/methods/dmd.md).

Two players on the core loop:

* the **generator** (the student, sampled in ``generative.student.steps`` steps): each update draws prior noise
  ``z`` (global torch RNG), makes ``x = G(x_in, u_in, c)`` with gradients, where ``x_in`` is ``z`` (one step)
  or, for few-step students with ``dmd.backward_simulation``, the input of a step ``k`` drawn uniformly and
  made by the current generator without gradients (DMD2's backward simulation; only step ``k`` learns); then
  applies the weighted terms of :mod:`.dmd_terms` to ``x`` (``dm``, ``ca`` through the proxy loss, each at its
  own re-noising level; ``kl``, ``reg``, ``gan`` as differentiable losses);
* the **fake-score critic**: a trainable copy of the teacher, ``dmd.critic_updates`` updates per generator
  update (TTUR) with its own learning rate, trained with the denoising loss on *detached* samples of the
  current generator (shared by reference, sampled under ``no_grad``), plus DMD2's classifier-head loss when
  ``gan_weight > 0`` (the head lives in the critic's objective state: checkpointed and optimized with it).

Both players' weights, objective states and optimizers are checkpointed by the core, so ``--resume`` is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from stillroom.config.dmd import DmdConfig
from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods import dmd_terms as terms
from stillroom.train.loop import Player, lr_factor


class GeneratorForward(nn.Module):
    """``batch -> {"x": G's samples [B, ...] (with grad), "labels" [B], "u_in": the trained step's input level}``."""

    def __init__(self, model: nn.Module, steps: int, stochastic: bool, backward_simulation: bool):
        super().__init__()
        self.model, self.steps, self.stochastic, self.backward_simulation = model, steps, stochastic, backward_simulation

    def forward(self, batch: Any) -> dict[str, Any]:
        from stillroom.domains.generative.sampling import generate

        model, labels = self.model, batch.labels
        z = model.convention.prior((labels.shape[0], *model.sample_shape()), device=labels.device)
        if self.steps > 1 and not self.backward_simulation:
            x = generate(model, z, labels, steps=self.steps, stochastic=self.stochastic)
            return {"x": x, "labels": labels, "u_in": 1.0}
        k = int(torch.randint(self.steps, (1,))) if self.steps > 1 else 0
        x_in, u_in = terms.step_input(model, z, labels, self.steps, k, self.stochastic)
        t_in = model.convention.time(torch.full((labels.shape[0],), u_in, device=labels.device))
        return {"x": model(x_in, t_in, labels), "labels": labels, "u_in": u_in}


def _frozen_call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with its parameters detached: gradients reach the inputs, never the module's weights
    (the critic and its head are another player's)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return functional_call(module, {**params, **dict(module.named_buffers())}, args)


@dataclass
class GeneratorObjective:
    """The generator's weighted DMD terms (see the module docstring). ``state`` holds the KL targets and the
    regression buffer as buffers (moved to the model's device, not checkpointed: they are rebuilt from the seed)."""

    forward: GeneratorForward
    teacher: nn.Module
    critic: nn.Module
    head: terms.ClassifierHead | None
    settings: DmdConfig
    state: nn.Module

    def __post_init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0

    def signal(self, batch: Any) -> Any:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        s, x, labels = self.settings, outputs["x"], outputs["labels"]
        pieces: dict[str, tuple[float, tuple[torch.Tensor, int]]] = {}
        if s.dm_weight > 0:
            pieces["dm"] = (s.dm_weight, self._dm(x, labels))
        if s.ca_weight > 0:
            pieces["ca"] = (s.ca_weight, self._ca(x, labels, outputs["u_in"]))
        if s.kl_weight > 0:
            from stillroom.domains.generative.engine import meanvar_kl

            pieces["kl"] = (s.kl_weight, meanvar_kl(x, self.state.kl_mu, self.state.kl_var, s.kl_over))
        if s.reg_weight > 0:
            pieces["reg"] = (s.reg_weight, self._regression(x.shape[0], x.device))
        if s.gan_weight > 0:
            pieces["gan"] = (s.gan_weight, self._gan(x, labels))
        total = sum(w * part[0] for w, part in pieces.values())
        self._note("variance", float(x.detach().float().flatten(1).var(dim=0).mean()) if x.shape[0] > 1 else 0.0)
        self._count += 1
        return LossResult(total=total, count=x.shape[0],
                          parts={k: float((w * part[0]).detach()) for k, (w, part) in pieces.items()})

    # ------------------------------------------------------------ the terms
    def _dm(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        from stillroom.domains.generative.engine import dmd_direction, proxy_loss, renoise_at
        from stillroom.domains.generative.sampling import guided_x0

        lo, hi = self.settings.dm_range
        u = terms.draw_fractions(x.shape[0], lo, hi, x.device)
        x_t, t = renoise_at(self.teacher.convention, x.detach(), u)
        with torch.no_grad():
            mu_real = guided_x0(self.teacher, x_t, t, labels, self.settings.real_guidance)
            mu_fake = self.critic(x_t, t, labels)
        g = dmd_direction(x.detach(), mu_real, mu_fake)
        self._note("norm_dm", terms.direction_norm(g))
        return proxy_loss(x, g)

    def _ca(self, x: torch.Tensor, labels: torch.Tensor, u_in: float) -> tuple[torch.Tensor, int]:
        from stillroom.domains.generative.engine import proxy_loss, renoise_at

        s = self.settings
        u = terms.ca_fractions(x.shape[0], s.ca_range, s.ca_schedule, u_in, x.device)
        x_t, t = renoise_at(self.teacher.convention, x.detach(), u)
        mu_cond, mu_uncond = terms.cond_uncond(self.teacher, x_t, t, labels)
        g = terms.ca_direction(x.detach(), mu_cond, mu_uncond, s.ca_guidance)
        self._note("norm_ca", terms.direction_norm(g))
        return proxy_loss(x, g)

    def _regression(self, b: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Squared L2 from ``G(z)`` to the teacher's ODE output ``y`` for ``b`` buffer pairs drawn with the global
        RNG; the whole sampling chain of the generator gets gradients."""
        from stillroom.domains.generative.sampling import generate

        st = self.state
        idx = torch.randint(st.reg_z.shape[0], (b,)).to(st.reg_z.device)
        f = self.forward
        x = generate(f.model, st.reg_z[idx], st.reg_labels[idx], steps=f.steps, stochastic=f.stochastic)
        sq = ((x.float() - st.reg_y[idx].float()) ** 2).flatten(1).sum(dim=1)
        return sq.sum(), b

    def _gan(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        from stillroom.domains.generative.engine import renoise_at

        lo, hi = self.settings.dm_range
        x_t, t = renoise_at(self.teacher.convention, x, terms.draw_fractions(x.shape[0], lo, hi, x.device))
        x_in, _ = self.critic.convention.net_input(x_t, t)
        logits = _frozen_call(self.head, x_in, _frozen_call(self.critic, x_t, t, labels), labels)
        return terms.gan_generator_loss(logits)

    # ------------------------------------------------------------ metrics
    def _note(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """``dmd/variance`` (the generator's per-dimension output variance over the batch), ``dmd/norm_dm`` and
        ``dmd/norm_ca`` (mean L2 norm of the directions), averaged over the update's micro-batches."""
        out = {f"dmd/{k}": v / max(1, self._count) for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


class CriticForward(nn.Module):
    """``batch -> the critic's prediction on re-noised detached generator samples`` (and the head's logits on
    fake and real points when a head is given). The generator is held by reference, not as a submodule."""

    def __init__(self, critic: nn.Module, generator: nn.Module, head: terms.ClassifierHead | None,
                 settings: DmdConfig, steps: int, stochastic: bool):
        super().__init__()
        self.critic, self.head, self.settings = critic, head, settings
        self._generator = (generator,)
        self.steps, self.stochastic = steps, stochastic

    @property
    def generator(self) -> nn.Module:
        return self._generator[0]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        from stillroom.domains.generative.engine import drop_labels, renoise_at
        from stillroom.domains.generative.sampling import generate

        gen, labels, s = self.generator, batch.labels, self.settings
        with torch.no_grad():
            z = gen.convention.prior((labels.shape[0], *gen.sample_shape()), device=labels.device)
            x_gen = generate(gen, z, labels, steps=self.steps, stochastic=self.stochastic).detach()
        conv = self.critic.convention
        x_t, t = renoise_at(conv, x_gen, terms.draw_fractions(labels.shape[0], *s.critic_range, labels.device))
        seen = drop_labels(labels, self.critic.null_label, s.critic_cond_dropout)
        out = {"x0_hat": self.critic(x_t, t, seen), "x0": x_gen, "t": t}
        if self.head is not None:
            lo, hi = s.dm_range
            fake_t, tf = renoise_at(conv, x_gen, terms.draw_fractions(labels.shape[0], lo, hi, labels.device))
            real_t, tr = renoise_at(conv, batch.x, terms.draw_fractions(labels.shape[0], lo, hi, labels.device))
            out["fake_logits"] = terms.head_logits(self.critic, self.head, fake_t, tf, labels)
            out["real_logits"] = terms.head_logits(self.critic, self.head, real_t, tr, labels)
        return out


@dataclass
class CriticObjective:
    """The critic's denoising loss on generator samples, plus ``gan_d_weight`` x the head's loss."""

    forward: CriticForward
    state: nn.Module

    def signal(self, batch: Any) -> Any:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        from stillroom.domains.generative.engine import denoising_loss

        critic = self.forward.critic
        total, count = denoising_loss(outputs["x0_hat"], outputs["x0"], outputs["t"], critic.convention)
        parts = {"denoise": float(total.detach())}
        if "fake_logits" in outputs:
            head_sum, _ = terms.gan_head_loss(outputs["fake_logits"], outputs["real_logits"])
            head_sum = self.forward.settings.gan_d_weight * head_sum
            parts["gan_head"] = float(head_sum.detach())
            total = total + head_sum
        return LossResult(total=total, count=count, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


@dataclass
class CriticPlayer(Player):
    """The critic's player: AdamW at ``lr`` (``dmd.critic_lr``, or ``train.lr``), no weight decay, the ``train``
    schedule."""

    lr: float | None = None

    def build_optimizer(self, tc) -> None:
        self.optimizer = torch.optim.AdamW(self.trainable(), lr=self.lr or tc.lr, betas=tc.betas, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tc))


@torch.no_grad()
def _generator_state(ctx: MethodContext, s: DmdConfig) -> nn.Module:
    """The generator objective's buffers: KL targets from the training data and the regression buffer
    (``reg_pairs`` teacher ODE outputs from noise drawn with the seed ``derive_seed(seed, "dmd-regression")``)."""
    from stillroom.domains.generative.data import balanced_labels
    from stillroom.domains.generative.sampling import generate

    state, teacher = nn.Module(), ctx.teacher_model
    device = next(teacher.parameters()).device
    if s.kl_weight > 0:
        mu, var = terms.data_moments(torch.stack([e.x for e in ctx.data.train]), s.kl_over)
        state.register_buffer("kl_mu", mu.to(device), persistent=False)
        state.register_buffer("kl_var", var.to(device), persistent=False)
    if s.reg_weight > 0:
        labels = balanced_labels(s.reg_pairs, teacher.num_classes)
        gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, "dmd-regression"))
        z = teacher.convention.prior((s.reg_pairs, *teacher.sample_shape()), generator=gen)
        y = torch.cat([generate(teacher, z[i:i + 1024].to(device), labels[i:i + 1024].to(device), steps=s.reg_steps,
                                guidance=s.real_guidance) for i in range(0, s.reg_pairs, 1024)])
        for name, value in (("reg_z", z), ("reg_labels", labels), ("reg_y", y)):
            state.register_buffer(name, value.to(device), persistent=False)
    return state


def build_players(ctx: MethodContext, student: Player) -> list[Player]:
    """``[generator, critic]`` for the student player's model (any :class:`Denoiser`; see the module docstring)."""
    s: DmdConfig = ctx.cfg.dmd
    teacher, generator = ctx.teacher_model, student.model
    if teacher is None:
        raise ValueError("method=dmd matches the teacher's distribution, but the run has no teacher")
    sc = ctx.cfg.generative.student
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    head = None
    if s.gan_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(ctx.cfg.seed, "dmd-gan-head"))
            head = terms.ClassifierHead(tuple(teacher.sample_shape()), teacher.num_classes, s.gan_width)
    head_state = head if head is not None else nn.Module()
    forward = GeneratorForward(generator, sc.steps, sc.stochastic, s.backward_simulation)
    gen_objective = GeneratorObjective(forward, teacher, critic, head, s, _generator_state(ctx, s))
    critic_forward = CriticForward(critic, generator, head, s, sc.steps, sc.stochastic)
    return [Player(student.name, generator, gen_objective),
            CriticPlayer("critic", critic, CriticObjective(critic_forward, head_state),
                         updates_per_step=s.critic_updates, lr=s.critic_lr)]


def build(ctx: MethodContext) -> MethodPlan:
    return MethodPlan(players=lambda student: build_players(ctx, student))


METHOD = Method("dmd", build=build, domains=("generative",))
