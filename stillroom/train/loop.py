"""The training loop. Read :func:`train` top to bottom; nothing important happens in hooks.

One training step updates each player (:mod:`stillroom.train.loop`) in order,
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
Under several processes each step first re-seeds the global generator from (seed, step, rank):
noise a method draws (a generator's prior samples, on-policy sampling) then differs between
processes, as in one process with the whole batch, and a resumed run draws what an
uninterrupted one would (one process keeps one stream, checkpointed with the run).
The loop knows ``(sum, count)`` and parameter groups, not tokens or models.

Players are the parameter groups a step updates, each with its optimizer, loss and update
ratio. Most runs have one, the student. Adversarial and score-distillation methods add a
second (a discriminator, a fake-score critic) with its own optimizer and an update ratio
(``updates_per_step``: a critic updated 5 times per generator update is a player with 5).
A player's :class:`Objective` turns one micro-batch into a ``(sum, count)`` loss:
``signal(batch)`` (the teacher's, no grad, timed), ``forward(batch)`` (the module that
distributed data parallel wraps), then ``loss(outputs, batch, signal)``.
:class:`DistillObjective` is the one every current domain uses: the student's outputs
(logits, or the last hidden state and the output head for the fused path, plus hidden
states and attentions) against a teacher signal, through a
:class:`~stillroom.losses.LossMix`, on the positions ``batch.loss_mask`` marks.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from stillroom.config.core import TrainConfig
from stillroom.data.seeds import derive_seed
from stillroom.losses import LossMix, LossResult, StudentOutput
from stillroom.train.counts import Sampler, StepCounts
from stillroom.models.precision import autocast as precision_autocast
from stillroom.train.distributed import Topology, no_sync
from stillroom.train.session import Session, TrainResult


# ---------------------------------------------------------------- players

class TeacherSource(Protocol):
    def signal(self, batch: Any) -> Any: ...


class Objective(Protocol):
    forward: torch.nn.Module
    """Runs the player's model on a batch; what distributed data parallel wraps."""
    state: torch.nn.Module
    """Objective state checkpointed with the player; its trainable parameters are optimized too."""

    def signal(self, batch: Any) -> Any: ...
    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult: ...
    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None: ...
    def metrics(self) -> dict[str, float]: ...


@dataclass
class DistillObjective:
    """Student outputs against a teacher signal through ``mix`` (see the module docstring).

    ``forward(batch)`` returns ``{"logits": [B, T, V]}`` or, on the fused path,
    ``{"hidden": [B, T, D], "head": OutputHead}`` (the output projection, applied by the loss chunk
    by chunk); plus ``hs_<i>`` hidden states and ``att_<i>`` attentions the mix asks for.
    ``teacher`` is ``None`` when no term needs one.
    """

    forward: torch.nn.Module
    mix: LossMix
    teacher: TeacherSource | None = None

    def __post_init__(self) -> None:
        if self.mix.needs_teacher and self.teacher is None:
            raise ValueError("the loss terms need a teacher, but no teacher source was built")

    @property
    def state(self) -> torch.nn.Module:
        return self.mix

    def signal(self, batch: Any) -> Any:
        return self.teacher.signal(batch) if self.mix.needs_teacher else None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        student = StudentOutput(
            logits_btv=outputs.get("logits"), hidden_btd=outputs.get("hidden"), head=outputs.get("head"),
            hidden_states={i: outputs[f"hs_{i}"] for i in self.mix.student_hidden_layers},
            attentions={int(k[4:]): v for k, v in outputs.items() if k.startswith("att_")},
        )
        return self.mix(student, signal, batch.target_ids, batch.loss_mask, batch.target_weight)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.mix.after_step(per_target, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.mix.log_state()


@dataclass
class Player:
    """A parameter group with its optimizer, loss and update ratio.

    ``model``: the module whose weights the player trains and checkpoints (e.g. the student);
    ``objective``: its loss; ``updates_per_step``: optimizer updates per training step, each on
    freshly drawn micro-batches; ``replace_batches`` / ``weight_targets``: the method's batch
    slots (:class:`stillroom.methods.base.MethodPlan`) for this player.
    """

    name: str
    model: torch.nn.Module
    objective: Objective
    updates_per_step: int = 1
    replace_batches: Callable | None = None
    weight_targets: Callable | None = None
    after_update: Callable[[], None] | None = None
    """Called right after each ``optimizer.step()`` and once after a resume restores the checkpoint (fixed
    sparsity masks re-zero the pruned weights: AdamW's momentum would otherwise regrow them)."""
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(default=None, repr=False)

    def trainable(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + [p for p in self.objective.state.parameters() if p.requires_grad]

    def build_optimizer(self, tc) -> None:
        """AdamW over the trainable parameters (no weight decay on vectors) with the ``train`` schedule: the fused
        kernel (one pass per tensor, no temporaries; ~5x faster than foreach on a CPU's embedding) where every
        parameter is a plain tensor, foreach where some are sharded (FSDP's DTensors)."""
        params = self.trainable()
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, **({"fused": True} if plain else {"foreach": True}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, tc))


def lr_factor(step: int, tc) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based): linear warm-up, then cosine or
    linear decay to ``min_lr_ratio``, or constant."""
    if tc.warmup_steps and step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    span = max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    floor = tc.min_lr_ratio
    if tc.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- the loop

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
    run_id: str | None = None
    """The run's id (``run.json``); every checkpoint carries it, and a resume refuses another run's checkpoint."""
    final_save_in_background: bool = False
    """Write the last step's checkpoint in a thread (one process only; :func:`~stillroom.train.checkpoint.
    save_checkpoint`), while the caller saves and evaluates: set by a caller that changes no trained tensor
    afterwards and waits for the write (:func:`~stillroom.train.checkpoint.wait_for_writes`) before it ends. The
    next training session waits for it before its first step."""


def train(job: TrainJob) -> TrainResult:
    """Run ``job.train.steps`` training steps (see the module docstring); returns what happened."""
    tc = job.train
    run = Session.start(job)  # optimizers, DDP wrappers, sampler; restored from the last checkpoint on resume
    for step in range(run.start_step, tc.steps):
        t0 = time.perf_counter()
        if job.topology.world_size > 1:  # noise a method draws (DMD's, on-policy's) differs by process, and resumes
            torch.manual_seed(derive_seed(job.seed, "process-step", step, job.topology.rank))
        record: dict[str, Any] = {"step": step + 1}
        for k, player in enumerate(job.players):
            for _ in range(player.updates_per_step):
                done = update(player, run, step)
                record.update(done if k == 0 else {f"{player.name}/{key}": v for key, v in done.items()})
        run.finish_step(step, record, time.perf_counter() - t0)
    return run.close()


def train_apart(job: TrainJob, seed: int | None = None) -> TrainResult:
    """:func:`train` without moving the caller's random state (the CPU's and the job's CUDA device's): a model
    trained on the way (a teacher built into the cache) leaves the run exactly as a cached one would. ``seed``:
    seed the forked state first (the model's noise then does not depend on where the caller's state stood)."""
    device = job.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        return train(job)


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
    # The objective's own learned parameters (e.g. hidden_mse projections) live outside the DDP module.
    topology.average_grads([p for p in player.objective.state.parameters() if p.requires_grad])
    loss = topology.all_reduce_sum(loss_sum) / targets
    if not math.isfinite(loss):
        player.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: the loss of {player.name} is {loss}; stopping ({run.where()})")
    grad_norm = None
    if tc.clip_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(player.trainable(), tc.clip_grad_norm))
    player.optimizer.step()
    if player.after_update is not None:  # e.g. re-apply fixed sparsity masks
        player.after_update()
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
        sync = no_sync(forward) if ddp and j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                outputs = forward(batch)
            result = player.objective.loss(outputs, batch, signal)
            (result.total * scale).backward()
        loss_sum += float(result.total.detach())
        for k, v in result.parts.items():
            parts[k] = parts.get(k, 0.0) + v
        # Drop this micro-batch's graph, outputs and teacher signal before the next one: held over, they would
        # double the teacher logits' memory and keep the loss's recycled buffers in use (losses/closed_form.py).
        del outputs, result, signal
    return loss_sum, teacher_s, parts
