"""``dd2``: Distilled Decoding 2 (Liu et al., NeurIPS 2025; spec 12): a one-step generator of token sequences
distilled from an autoregressive teacher by conditional score distillation.

Times follow rectified flow (``Convention("rf")``: ``q^t = (1 - t) q + t eps``, ``t = 1`` noise). The teacher's
conditional score is analytic (:mod:`stillroom.domains.autoregressive.score`): ``mu_Phi(x, t | q_<i) =
sum_j w_j c_j`` with ``p = p_Phi(. | q_<i)``. Networks predict the clean token ``mu``; the score is
``-(x - (1 - t) mu) / t^2``, so every loss below is the spec's score loss in denoiser (x0) units, i.e. weighted
by ``t^4 / (1 - t)^2`` (the usual choice that keeps small ``t`` from dominating). Positions are summed
(``count = B * n``):

* GTS (initialisation, :func:`gts_loss`): ``sum_i ||mu_psi(q_i^t, t | q_<i) - mu_Phi(q_i^t, t | q_<i)||^2`` on
  teacher-sampled sequences; trained once through the loop (``dd2.gts_steps``), cached, and copied into both the
  generator and the guidance network (the same :class:`~stillroom.domains.autoregressive.nets.CondDenoiser`);
* FCS (guidance player, :func:`fcs_loss`): ``sum_i ||mu_psi(q_i^t, t | q_<i) - q_i||^2`` on detached generator
  samples (denoising score matching);
* CSD (generator player, :func:`csd_loss`), conditioned on the stop-gradient generated prefix (snapped to
  codewords for the teacher, continuous for the guidance): SiD with alpha = 1,
  ``sum_i (mu_Phi - mu_psi) . (mu_psi - q_i)`` with gradients through ``q_i`` and ``q_i^t`` (both networks'
  weights frozen), or the DMD form: the gradient ``(mu_psi - mu_Phi) / mean|q_i - mu_Phi|`` applied to ``q_i`` by
  the proxy loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stillroom.methods.base import Method, MethodContext, MethodPlan

GTS_FILE = "gts"


# ------------------------------------------------------------------ losses (pure)
def noisy(q_bnd: torch.Tensor, t_bn: torch.Tensor, eps_bnd: torch.Tensor) -> torch.Tensor:
    """``q^t = (1 - t) q + t eps`` per position (rectified flow, ``t = 1`` noise)."""
    return (1 - t_bn[..., None]) * q_bnd + t_bn[..., None] * eps_bnd


def gts_loss(mu_psi_bnd: torch.Tensor, mu_phi_bnd: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over positions ||mu_psi - mu_Phi||^2, B * n)``: regress the teacher's analytic denoiser."""
    return ((mu_psi_bnd - mu_phi_bnd.detach()) ** 2).sum(), mu_psi_bnd.shape[0] * mu_psi_bnd.shape[1]


def fcs_loss(mu_psi_bnd: torch.Tensor, q_bnd: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum over positions ||mu_psi - q||^2, B * n)``: denoising score matching on generator samples ``q``."""
    return ((mu_psi_bnd - q_bnd.detach()) ** 2).sum(), mu_psi_bnd.shape[0] * mu_psi_bnd.shape[1]


def csd_loss(q_bnd: torch.Tensor, mu_phi_bnd: torch.Tensor, mu_psi_bnd: torch.Tensor,
             form: str = "sid") -> tuple[torch.Tensor, int]:
    """``(sum over positions d, B * n)`` with ``d`` SiD's alpha = 1 term ``(mu_Phi - mu_psi) . (mu_psi - q)`` (``form
    = "sid"``; gradients flow through ``q`` and through both predictions' inputs) or the DMD proxy loss whose
    gradient on ``q`` is ``(mu_psi - mu_Phi) / mean|q - mu_Phi|`` per position (``form = "dmd"``)."""
    from stillroom.domains.generative.engine import dmd_direction, proxy_loss

    count = q_bnd.shape[0] * q_bnd.shape[1]
    if form == "sid":
        return ((mu_phi_bnd - mu_psi_bnd) * (mu_psi_bnd - q_bnd)).sum(), count
    if form != "dmd":
        raise ValueError(f"dd2.generator_loss must be sid or dmd, got {form!r}")
    flat_q = q_bnd.reshape(count, -1)
    g = dmd_direction(flat_q, mu_phi_bnd.reshape(count, -1), mu_psi_bnd.reshape(count, -1))
    return proxy_loss(flat_q, g)[0], count


def times(shape: tuple[int, ...], t_min: float, t_max: float, device: torch.device) -> torch.Tensor:
    """Noise levels ``t ~ U(t_min, t_max)`` (the global RNG: checkpointed, so a resumed run draws the same)."""
    return t_min + (t_max - t_min) * torch.rand(shape, device=device)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters take no gradient inside (the generator's loss must not leave gradients on the
    guidance network, whose own update follows)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ------------------------------------------------------------------ the three forwards
@dataclass
class TeacherView:
    """The frozen teacher as DD2 reads it: next-token probabilities of id prefixes, the codebook, its joint."""

    model: nn.Module
    codebook_vd: torch.Tensor
    joint: torch.Tensor

    def probs(self, tokens_bn: torch.Tensor) -> torch.Tensor:
        from stillroom.domains.autoregressive.teacher import next_token_probs

        return next_token_probs(self.model, tokens_bn, len(self.codebook_vd))

    def mu(self, x_bnd: torch.Tensor, t_bn: torch.Tensor, probs_bnv: torch.Tensor) -> torch.Tensor:
        from stillroom.domains.autoregressive.score import teacher_denoiser

        b, n, d = x_bnd.shape
        mu = teacher_denoiser(x_bnd.reshape(b * n, d), t_bn.reshape(-1), probs_bnv.reshape(b * n, -1),
                              self.codebook_vd.to(x_bnd))
        return mu.reshape(b, n, d)

    def sample(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[batch, n]`` sequences from the teacher's exact joint (its ancestral samples' distribution)."""
        v, length = self.joint.shape[0], self.joint.dim()
        flat = torch.multinomial(self.joint.reshape(-1).float().to(device), batch, replacement=True)
        place = v ** torch.arange(length - 1, -1, -1, device=device)
        return (flat[:, None] // place[None, :]) % v


class GtsForward(nn.Module):
    """GTS: ``batch -> {"mu_psi", "mu_phi"}`` on fresh teacher samples (the batch gives only its size)."""

    def __init__(self, net: nn.Module, teacher: TeacherView, t_range: tuple[float, float]):
        super().__init__()
        self.net, self.teacher, self.t_range = net, teacher, t_range

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        device = batch.tokens.device
        tokens_bn = self.teacher.sample(batch.tokens.shape[0], device)
        q_bnd = self.teacher.codebook_vd.to(device)[tokens_bn]
        t_bn = times(tokens_bn.shape, *self.t_range, device)
        x_bnd = noisy(q_bnd, t_bn, torch.randn_like(q_bnd))
        mu_phi = self.teacher.mu(x_bnd, t_bn, self.teacher.probs(tokens_bn))
        return {"mu_psi": self.net(x_bnd, t_bn, q_bnd), "mu_phi": mu_phi}


class GuidanceForward(nn.Module):
    """FCS: ``batch -> {"mu_psi", "q"}``: the guidance network's prediction at re-noised detached generator samples."""

    def __init__(self, guidance: nn.Module, generator: nn.Module, t_range: tuple[float, float]):
        super().__init__()
        self.guidance, self.t_range = guidance, t_range
        self._generator = [generator]  # not a submodule: the guidance player neither trains nor saves it

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        b, n = batch.tokens.shape
        device = batch.tokens.device
        with torch.no_grad():
            q_bnd = self._generator[0].generate(torch.randn(b, n, 2, device=device))
        t_bn = times((b, n), *self.t_range, device)
        x_bnd = noisy(q_bnd, t_bn, torch.randn_like(q_bnd))
        return {"mu_psi": self.guidance(x_bnd, t_bn, q_bnd), "q": q_bnd}


class GeneratorForward(nn.Module):
    """CSD: ``batch -> {"q", "mu_phi", "mu_psi"}``: generated tokens and both predictions at their re-noised
    versions, conditioned on the stop-gradient generated prefix."""

    def __init__(self, generator: nn.Module, guidance: nn.Module, teacher: TeacherView, t_range: tuple[float, float]):
        super().__init__()
        self.generator, self.teacher, self.t_range = generator, teacher, t_range
        self._guidance = [guidance]  # not a submodule: frozen here, trained by its own player

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        from stillroom.domains.autoregressive.toy import snap

        b, n = batch.tokens.shape
        device = batch.tokens.device
        q_bnd = self.generator.generate(torch.randn(b, n, 2, device=device))
        prefix_bnd = q_bnd.detach()
        t_bn = times((b, n), *self.t_range, device)
        x_bnd = noisy(q_bnd, t_bn, torch.randn_like(q_bnd))
        probs_bnv = self.teacher.probs(snap(prefix_bnd, self.teacher.codebook_vd))
        with frozen(self._guidance[0]) as guidance:
            mu_psi = guidance(x_bnd, t_bn, prefix_bnd)
        return {"q": q_bnd, "mu_phi": self.teacher.mu(x_bnd, t_bn, probs_bnv), "mu_psi": mu_psi}


class Dd2Objective:
    """One of DD2's losses (``kind``: ``gts``, ``fcs``, ``csd``) on its forward's outputs, as a loop objective."""

    def __init__(self, forward: nn.Module, kind: str, form: str = "sid"):
        self.forward, self.kind, self.form, self.state = forward, kind, form, nn.Module()

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any):
        from stillroom.losses import LossResult

        if self.kind == "gts":
            total, count = gts_loss(outputs["mu_psi"], outputs["mu_phi"])
        elif self.kind == "fcs":
            total, count = fcs_loss(outputs["mu_psi"], outputs["q"])
        else:
            total, count = csd_loss(outputs["q"], outputs["mu_phi"], outputs["mu_psi"], self.form)
        return LossResult(total=total, count=count, parts={self.kind: float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


# ------------------------------------------------------------------ players and the GTS stage
def guidance_player_class():
    from stillroom.train.loop import Player, lr_factor

    @dataclass
    class GuidancePlayer(Player):
        """The guidance network's player: AdamW at ``dd2.guidance_lr`` (``train.lr`` when null), the ``train``
        schedule."""

        lr: float | None = None

        def build_optimizer(self, tc) -> None:
            params = self.trainable()
            groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr or tc.lr, betas=tc.betas)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tc))

    return GuidancePlayer


def teacher_view(ctx: MethodContext) -> TeacherView:
    from stillroom.domains.autoregressive.teacher import teacher_joint

    toy, device = ctx.data.toy, next(ctx.model.parameters()).device
    joint = teacher_joint(ctx.teacher_model, toy.vocab, toy.length, device)
    return TeacherView(ctx.teacher_model, toy.codebook_vd.to(device), joint)


def gts_key(ctx: MethodContext) -> str:
    """16 hex digits hashing the GTS settings, the network's shape, the teacher's weights and the seed."""
    s = ctx.cfg.dd2
    h = hashlib.sha256(json.dumps({"gts": [s.gts_steps, s.gts_lr, s.gts_batch_size, s.t_min, s.t_max],
                                   "shape": ctx.model.shape, "seed": ctx.cfg.seed, "version": 1}).encode())
    for name, tensor in sorted(ctx.teacher_model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gts_network(ctx: MethodContext, teacher: TeacherView) -> nn.Module:
    """The GTS model (see the module docstring): trained once through the loop and cached under
    ``<cache_dir>/dd2_gts/<key>/``, or loaded from there."""
    from stillroom.data.seeds import derive_seed
    from stillroom.domains.autoregressive.nets import load_net
    from stillroom.models.builtin import cache_root
    from stillroom.models.cached import build_once

    folder = cache_root(ctx.cfg.cache_dir) / "dd2_gts" / gts_key(ctx)
    seed = derive_seed(ctx.cfg.seed, "dd2-gts")
    if not build_once(folder, complete=lambda f: (f / "gts.json").is_file(), topology=ctx.topology,
                      build=lambda tmp: _train_gts(ctx, teacher, tmp, seed)):
        ctx.log(f"dd2: GTS initialisation from the cache {folder}")
    return load_net(folder, "cached dd2 GTS model").to(teacher.codebook_vd.device)


def _train_gts(ctx: MethodContext, teacher: TeacherView, tmp, seed: int) -> None:
    from stillroom.config.core import TrainConfig
    from stillroom.data.batch import ExampleSampler
    from stillroom.domains.autoregressive.data import collate_sequences
    from stillroom.domains.autoregressive.nets import build_net, save_net
    from stillroom.train.distributed import Topology
    from stillroom.train.loop import Player, TrainJob, train_apart

    s, device = ctx.cfg.dd2, teacher.codebook_vd.device
    net = build_net(ctx.model.shape, seed).to(device)
    ctx.log(f"dd2: GTS stage, {s.gts_steps} steps fitting the teacher's analytic score on its own samples")
    tc = TrainConfig(steps=s.gts_steps, micro_batch_size=s.gts_batch_size, lr=s.gts_lr, weight_decay=0.0,
                     warmup_steps=min(20, s.gts_steps - 1), schedule="cosine", precision="fp32", device=str(device),
                     keep_checkpoints=1, log_every=max(1, s.gts_steps // 5), clip_grad_norm=1.0)
    objective = Dd2Objective(GtsForward(net, teacher, (s.t_min, s.t_max)), "gts")
    job = TrainJob(train=tc, seed=seed, run_dir=tmp / "run", run_name="dd2-gts", players=[Player("gts", net, objective)],
                   examples=ctx.data.train, collate=collate_sequences, topology=Topology(), device=device,
                   sampler=ExampleSampler, log=ctx.log, unit="tok")
    result = train_apart(job, seed=seed)
    shutil.rmtree(tmp / "run", ignore_errors=True)
    save_net(net, tmp)
    (tmp / "gts.json").write_text(json.dumps({"steps": s.gts_steps, "final_loss": result.final_loss}) + "\n")


def _players(ctx: MethodContext) -> list:
    from stillroom.data.seeds import derive_seed
    from stillroom.domains.autoregressive.nets import build_net
    from stillroom.train.loop import Player

    s, generator = ctx.cfg.dd2, ctx.model
    teacher = teacher_view(ctx)
    guidance = build_net(generator.shape, derive_seed(ctx.cfg.seed, "dd2-guidance")).to(teacher.codebook_vd.device)
    if s.gts_steps > 0:
        init = gts_network(ctx, teacher).state_dict()
        generator.load_state_dict(init)
        guidance.load_state_dict(init)
    t_range = (s.t_min, s.t_max)
    student = Player("student", generator, Dd2Objective(GeneratorForward(generator, guidance, teacher, t_range), "csd",
                                                       s.generator_loss))
    critic = guidance_player_class()("guidance", guidance, Dd2Objective(GuidanceForward(guidance, generator, t_range),
                                                                        "fcs"),
                                     updates_per_step=s.guidance_updates, lr=s.guidance_lr)
    return [student, critic]


def build(ctx: MethodContext) -> MethodPlan:
    if ctx.teacher_model is None:
        raise ValueError("method=dd2 distils the teacher's conditional scores, but the run has no teacher")
    players = _players(ctx)  # the GTS stage runs (or loads) here, before the run's first evaluation
    return MethodPlan(players=lambda student: players)


METHOD = Method("dd2", build=build, domains=("autoregressive",))
