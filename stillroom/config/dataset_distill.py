"""The ``ast`` section: dataset distillation by trajectory matching (MTT + AST), read by ``stillroom distill-data``.

AST (Shen, Yang, Lam 2023; a fork of MTT, Cazenavette et al. 2022) learns a few synthetic images per class
such that a few SGD steps on them, from an expert checkpoint trained on the real images, land near the
expert's later checkpoint. The command reads ``domain: classifier`` for the data set (``classifier.dataset``,
``classifier.heldout_fraction``) and the network (``classifier.student``: the architecture of the experts,
of the unrolled student and of the fresh networks trained on the result), ``train.steps`` for the outer
iterations and ``train.save_every`` / ``log_every`` / ``keep_checkpoints`` / ``device`` for the loop.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stillroom.config.core import Strict


class AstExperts(Strict):
    """Expert trajectories: classifiers trained on the real training images with cross-entropy, SGD with
    momentum and one lr drop, their parameters saved after every epoch (cached by settings and data)."""

    count: int = Field(8, ge=1, description="Expert trajectories trained (E); each outer iteration draws one.")
    epochs: int = Field(20, ge=2, description="Epochs per expert; the trajectory holds epochs + 1 checkpoints.")
    lr: float = Field(0.01, gt=0, description="Expert SGD learning rate (AST lr_teacher); also the learnable "
                      "student lr's initial value.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Expert SGD momentum.")
    weight_decay: float = Field(1e-3, ge=0, description="Expert SGD weight decay (AST --l2 0.001).")
    batch_size: int = Field(256, ge=1, description="Real images per expert step.")
    lr_drop: float = Field(0.6, gt=0, le=1, description="The expert lr is multiplied by this once, at epoch "
                           "epochs // 2 + 1 (AST's buffer.py).")
    clip_loss: bool = Field(False, description="AST's clipping loss: in epoch e < clip_epochs the minibatch CE "
                            "is scaled by clip_start + (1 - clip_start) * e / clip_epochs (0.5, 0.55, ..., 0.95 "
                            "with the defaults), damping early fast movement; 1 afterwards.")
    clip_start: float = Field(0.5, gt=0, le=1, description="Clipping loss factor of epoch 0.")
    clip_epochs: int = Field(10, ge=1, description="Epochs over which the clipping loss factor rises to 1.")
    gradient_penalty: float = Field(0.0, ge=0, description="AST's input-gradient penalty weight lambda (AST: 2; "
                                    "0: off): lambda * mean over images and pixels of (||d sum(logits) / dx||_2 "
                                    "over channels - 1)^2 on the batch's images, added to the scaled CE.")
    seed: int | None = Field(None, description="Seed of the experts' initialisations and data order "
                             "(null: the run's seed). Part of the cache key.")


class AstConfig(Strict):
    """Trajectory matching settings (the spec's section 5.3-5.4; defaults: its CPU experiment on digits)."""

    ipc: int = Field(1, ge=1, description="Synthetic images per class (labels fixed, class-balanced).")
    init: Literal["real", "representative", "noise"] = Field(
        "real", description="real: random real training images of each class (MTT). representative: k-means "
        "(k = ipc) over a fully trained expert's logits of each class, the real image nearest each centroid "
        "(AST's intended version). noise: standard normal pixels.")
    syn_steps: int = Field(10, ge=1, description="Inner student steps N unrolled per outer iteration.")
    expert_epochs: int = Field(2, ge=1, description="Target M: match the expert checkpoint M epochs after the start.")
    max_start_epoch: int = Field(10, ge=1, description="Start epochs s are drawn from 0 .. max_start_epoch - 1.")
    batch_syn: int | None = Field(None, ge=1, description="Synthetic images per inner step (null: all of them).")
    inner_momentum: float = Field(0.0, ge=0, lt=1, description="Momentum of the unrolled inner SGD (b_k = mom * "
                                  "b_(k-1) + g_k); 0: MTT's plain SGD.")
    lr_img: float = Field(100.0, gt=0, description="Learning rate of the synthetic images (SGD, momentum 0.5).")
    lr_lr: float = Field(1e-5, gt=0, description="Learning rate of the learnable student lr (SGD, momentum 0.5).")
    outer_momentum: float = Field(0.5, ge=0, lt=1, description="Momentum of both outer optimizers (MTT: 0.5).")
    balance_loss: bool = Field(False, description="AST's start-epoch-balanced inner CE: scaled by log_5(s - T/2 + "
                               "8) when s >= T/2, else divided by log_5(T/2 - s + 8), T = max_start_epoch.")
    intermediate_matching: bool = Field(False, description="AST's agg_middle_loss: also match student step "
                                        "i * (N // M) to expert epoch s + i for i = 1 .. M - 1, each normalised.")
    weight_perturb: float = Field(0.0, ge=0, description="AST's weight perturbation alpha (AST: 1; 0: off): every "
                                  "4-D (conv) weight W of the start checkpoint becomes W + alpha * d * W, d a "
                                  "standard normal tensor divided by its Frobenius norm. An MLP has no 4-D weight.")
    standardize: bool = Field(True, description="Standardise pixels with the training images' mean and std "
                              "(synthetic images live in that space; the grid shows them mapped back).")
    eval_networks: int = Field(5, ge=1, description="Fresh networks trained on the distilled set (and on the "
                               "random real subset) for the report's mean and std.")
    eval_epochs: int = Field(300, ge=1, description="Epochs of each fresh network (SGD momentum 0.9, weight decay "
                             "5e-4, lr halved at half way; batch: the whole set up to 256).")
    experts: AstExperts = Field(default_factory=AstExperts)

    @model_validator(mode="after")
    def _fits_the_trajectory(self) -> "AstConfig":
        last = self.max_start_epoch - 1 + self.expert_epochs
        if last > self.experts.epochs:
            raise ValueError(f"ast.max_start_epoch ({self.max_start_epoch}) - 1 + ast.expert_epochs "
                             f"({self.expert_epochs}) = {last} is past the experts' last epoch "
                             f"(ast.experts.epochs={self.experts.epochs}); lower one or raise ast.experts.epochs")
        if self.intermediate_matching and self.syn_steps < self.expert_epochs:
            raise ValueError(f"ast.intermediate_matching needs ast.syn_steps ({self.syn_steps}) >= "
                             f"ast.expert_epochs ({self.expert_epochs}): one student step per matched epoch")
        return self
