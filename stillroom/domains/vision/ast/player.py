"""Trajectory matching as a player of the one loop (spec 5.3): checkpointed, resumed exactly.

One training step is one outer iteration. The player's model is the :class:`~.synthetic.SyntheticSet`; its
objective's forward draws an expert ``i`` and a start epoch ``s`` from a generator seeded by ``(seed, draw)``
(``draw`` a counter in the objective's checkpointed state, so a resumed run draws what the uninterrupted one
did), perturbs the start checkpoint's conv weights (``weight_perturb``), unrolls ``syn_steps`` inner steps on
the synthetic images (:func:`~.unroll.unroll`, inner CE scaled by :func:`~.losses.balanced_factor` when
``balance_loss``) and returns the outer loss

    L = d(theta_N, theta*_(s+M)) + [intermediate] sum_(i=1..M-1) d(theta_(i * (N // M)), theta*_(s+i)),

``d`` the :func:`~.losses.normalised_distance` with the *unperturbed* ``theta*_s`` in the normaliser. The loop
counts one target per step, so it backpropagates ``L`` itself; :class:`AstPlayer` steps the images and the lr
with SGD (momentum 0.5, each at its own lr), as MTT does, instead of the core's AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from stillroom.config.dataset_distill import AstConfig
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.ast.experts import Trajectories
from stillroom.domains.vision.ast.losses import balanced_factor, flat, normalised_distance, perturb_weights
from stillroom.domains.vision.ast.synthetic import SyntheticSet
from stillroom.domains.vision.ast.unroll import unroll
from stillroom.losses import LossResult
from stillroom.train.loop import Player


@dataclass
class OuterBatch:
    """The loop's batch of one outer iteration: one target (the outer loss), nothing to move."""

    target_weight: None = None

    @property
    def num_targets(self) -> int:
        return 1

    def to(self, device: torch.device | str) -> "OuterBatch":
        return self


def collate_outer(examples: list) -> OuterBatch:
    return OuterBatch()


class DrawState(nn.Module):
    """The objective's checkpointed state: how many outer iterations have drawn their randomness."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))


class MatchForward(nn.Module):
    """One outer iteration's matching loss (see the module docstring); ``forward(batch) -> {"loss", "info"}``."""

    def __init__(self, synthetic: SyntheticSet, arch: nn.Module, experts: Trajectories, settings: AstConfig,
                 seed: int, state: DrawState):
        super().__init__()
        self.synthetic, self.arch, self.state = synthetic, arch, state
        self.experts, self.settings, self.seed = experts, settings, seed

    def forward(self, batch: OuterBatch) -> dict:
        s_cfg = self.settings
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "ast-outer", int(self.state.draws)))
        self.state.draws += 1
        expert = int(torch.randint(len(self.experts.params), (1,), generator=gen))
        start = int(torch.randint(s_cfg.max_start_epoch, (1,), generator=gen))
        trajectory = self.experts.params[expert]
        theta0 = perturb_weights(trajectory[start], s_cfg.weight_perturb, gen)
        factor = balanced_factor(start, s_cfg.max_start_epoch) if s_cfg.balance_loss else 1.0
        steps = unroll(self.arch, theta0, self.synthetic.images, self.synthetic.labels, lr=self.synthetic.lr,
                       steps=s_cfg.syn_steps, batch_syn=s_cfg.batch_syn, momentum=s_cfg.inner_momentum,
                       factor=factor, generator=gen)
        m = s_cfg.expert_epochs
        start_p = flat(trajectory[start])
        loss, _ = normalised_distance(flat(steps[-1]), flat(trajectory[start + m]), start_p)
        info = {"final_distance": float(loss.detach()), "expert": expert, "start_epoch": start}
        if s_cfg.intermediate_matching:
            every = s_cfg.syn_steps // m
            for i in range(1, m):
                term, _ = normalised_distance(flat(steps[i * every]), flat(trajectory[start + i]), start_p)
                loss = loss + term
        return {"loss": loss, "info": info}


@dataclass
class MatchObjective:
    """The player's objective: the forward's loss as a ``(sum, count = 1)`` :class:`LossResult`."""

    forward: MatchForward
    state: DrawState
    last: dict = field(default_factory=dict)

    def signal(self, batch: OuterBatch) -> None:
        return None

    def loss(self, outputs: dict, batch: OuterBatch, signal: None) -> LossResult:
        self.last = outputs["info"]
        return LossResult(total=outputs["loss"], count=1, parts={"match": float(outputs["loss"].detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"syn_lr": float(self.forward.synthetic.lr.detach()), **self.last}


@dataclass
class AstPlayer(Player):
    """The synthetic set's player: SGD with momentum on two groups, the images at ``lr_img`` and the student
    lr at ``lr_lr`` (MTT's outer optimizers), constant (the ``train`` schedule does not apply)."""

    settings: AstConfig | None = None

    def build_optimizer(self, tc) -> None:
        s = self.settings
        groups = [{"params": [self.model.images], "lr": s.lr_img}, {"params": [self.model.lr], "lr": s.lr_lr}]
        self.optimizer = torch.optim.SGD(groups, lr=s.lr_img, momentum=s.outer_momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _step: 1.0)


def ast_player(synthetic: SyntheticSet, arch: nn.Module, experts: Trajectories, settings: AstConfig,
               seed: int) -> AstPlayer:
    """The player that trains ``synthetic`` by trajectory matching against ``experts``."""
    state = DrawState()
    forward = MatchForward(synthetic, arch, experts, settings, derive_seed(seed, "ast-distill"), state)
    return AstPlayer("synthetic", synthetic, MatchObjective(forward, state), settings=settings)
