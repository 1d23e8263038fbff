"""The training loop. Read :func:`train` top to bottom; nothing important happens in hooks.

One training step updates each player (:mod:`stillroom.train.players`) in order,
``updates_per_step`` times. One update (:func:`update`):
  1. draw ``grad_accum`` micro-batches for this process (the sampler splits each
     global micro-batch across processes); the method may replace them (on-policy);
  2. count the targets of all of them, summed over processes: ``N`` (tokens for a
     language model, examples for a classifier: whatever ``batch.num_targets`` counts);
     then the method may weight the targets, knowing ``N``;
  3. for each micro-batch: teacher signal (no grad), forward, loss ``(sum, count)``;
     backward of ``sum * world_size / N`` (DDP averages gradients over processes, so
     the factor makes the result the gradient of ``total sum / N``: 1x8, 4x2 and 8x1
     accumulation, and 1 or 2 processes, give the same gradient);
  4. stop on a non-finite loss; clip; step; schedule.
Then the step is logged, evaluated and checkpointed (:mod:`stillroom.train.session`).
The loop knows ``(sum, count)`` and parameter groups, not tokens or models.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stillroom.config.core import TrainConfig
from stillroom.methods.base import Sampler, StepCounts
from stillroom.models.precision import autocast as precision_autocast
from stillroom.train.distributed import Topology
from stillroom.train.players import Player
from stillroom.train.session import Session, TrainResult


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainJob:
    """Everything one training run needs, built and checked before step 0."""

    train: TrainConfig
    seed: int
    run_dir: Path
    run_name: str
    players: list[Player]
    examples: list[Any]
    collate: Callable[[list[Any]], Any]
    """Examples -> one micro-batch (``.to(device)``, ``.num_targets``, ``.target_weight``)."""
    topology: Topology
    device: torch.device
    sampler: Callable[..., Sampler]
    """Called as ``sampler(n=, batch_size=, seed=, shuffle=, rank=, world_size=, group_size=)``."""
    group_size: int = 1
    evaluate: Callable[[torch.nn.Module], dict] | None = None
    """Periodic held-out metrics of the first player's model (``train.eval_every``)."""
    metrics: Callable[[], dict] | None = None
    """The method's per-step metrics."""
    resume: bool = False
    log: Callable[[str], None] = field(default=print)
    unit: str = "targets"
    """What one target is, for the progress line (``tok`` for a language model, ``img`` for a classifier)."""


def train(job: TrainJob) -> TrainResult:
    """Run ``job.train.steps`` training steps (see the module docstring); returns what happened."""
    tc = job.train
    run = Session.start(job)  # optimizers, DDP wrappers, sampler; restored from the last checkpoint on resume
    for step in range(run.start_step, tc.steps):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"step": step + 1}
        for k, player in enumerate(job.players):
            for _ in range(player.updates_per_step):
                done = update(player, run, step)
                record.update(done if k == 0 else {f"{player.name}/{key}": v for key, v in done.items()})
        run.finish_step(step, record, time.perf_counter() - t0)
    return run.close()


def update(player: Player, run: Session, step: int) -> dict[str, Any]:
    """One optimizer update of ``player`` on freshly drawn micro-batches; returns its metrics."""
    job, tc, topology = run.job, run.job.train, run.job.topology
    micro = [job.collate([job.examples[i] for i in run.sampler.next_indices()]) for _ in range(tc.grad_accum)]
    t_gen = time.perf_counter()
    if player.replace_batches is not None:  # the method decides where sequences come from (e.g. on-policy)
        micro = player.replace_batches(micro, step)
    generate_s = time.perf_counter() - t_gen if player.replace_batches is not None else 0.0
    targets = topology.all_reduce_sum(sum(b.num_targets for b in micro))
    if targets == 0:
        raise ValueError(f"step {step}: no targets in this step's batches; check data.format and masks")
    if player.weight_targets is not None:  # per-target weights, chosen knowing the step's N
        counts = StepCounts(step=step, targets=targets, all_reduce_sum=topology.all_reduce_sum)
        for b, w in zip(micro, player.weight_targets(micro, counts)):
            b.target_weight = w
    loss_sum, teacher_s, parts = forward_backward(
        micro, player, run.forwards[player.name], device=job.device, autocast=run.autocast,
        scale=topology.world_size / targets, ddp=topology.enabled,
    )
    loss = topology.all_reduce_sum(loss_sum) / targets
    if not math.isfinite(loss):
        player.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: the loss of {player.name} is {loss}; stopping ({run.where()})")
    grad_norm = None
    if tc.clip_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(player.trainable(), tc.clip_grad_norm))
    player.optimizer.step()
    player.scheduler.step()
    player.optimizer.zero_grad(set_to_none=True)
    per_target = {k: topology.all_reduce_sum(v) / targets for k, v in sorted(parts.items())}
    player.objective.after_step(per_target, step, tc.steps)
    return {"loss": loss, "lr": player.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "targets": int(targets), "teacher_s": teacher_s, "generate_s": generate_s,
            **{f"loss/{k}": v for k, v in per_target.items()}, **player.objective.metrics()}


def forward_backward(micro: list, player: Player, forward: torch.nn.Module, *, device: torch.device,
                     scale: float, ddp: bool = False, precision: str = "fp32",
                     autocast: contextlib.AbstractContextManager | None = None) -> tuple[float, float, dict[str, float]]:
    """Accumulate the gradient of ``scale * sum of the loss sums`` over ``micro``.

    Returns the (unscaled) loss sum, the seconds spent in the teacher, and the per-term
    sums. With ``scale = world_size / global_target_count`` the result is independent of
    how the targets are split into micro-batches and processes. ``forward`` is the
    objective's forward module, or its DDP wrapper; it runs under ``autocast`` (a reusable
    context, :func:`stillroom.models.precision.autocast`; built from ``precision`` when not given).
    """
    autocast = autocast or precision_autocast(precision, device)
    loss_sum, teacher_s = 0.0, 0.0
    parts: dict[str, float] = {}
    for j, batch in enumerate(micro):
        batch = batch.to(device)
        t_teacher = time.perf_counter()
        signal = player.objective.signal(batch)
        if signal is not None:  # a player without a teacher spends no teacher time
            teacher_s += time.perf_counter() - t_teacher
        sync = forward.no_sync() if ddp and j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                outputs = forward(batch)
            result = player.objective.loss(outputs, batch, signal)
            (result.total * scale).backward()
        loss_sum += float(result.total.detach())
        for k, v in result.parts.items():
            parts[k] = parts.get(k, 0.0) + v
    return loss_sum, teacher_s, parts
