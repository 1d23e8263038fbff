"""The state a training run carries between steps: optimizers, samplers, checkpoints, metrics, progress.

:class:`Session` is what :func:`stillroom.train.loop.train` builds before step 0 and
updates after every step; it keeps the loop itself short. Checkpoints hold, per
player, the model's weights (``<player>.safetensors``), the objective's state
(``<player>.objective.safetensors``), the optimizer and the schedule; and the
sampler's position, the RNG states, the step, the training seconds so far and the
run's id (``job.run_id`` where the orchestration set one), so a resumed run continues
exactly where the checkpoint left it, and a checkpoint of another run is refused.

Several processes share the student through DDP (``train.parallel: ddp``) or FSDP2 (``fsdp``:
:mod:`stillroom.train.fsdp`, sharded before the optimizers are built; checkpoints gathered whole,
so their format is the same; every weight gathered again when training ends).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stillroom.models.precision import autocast
from stillroom.train import fsdp
from stillroom.train.checkpoint import (
    checkpoint_run_id, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state, wait_for_writes,
)
from stillroom.train.metrics import MetricsLog
from stillroom.train.progress import Progress

if TYPE_CHECKING:
    from stillroom.train.loop import TrainJob


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    median_step_s: float = 0.0
    median_teacher_s: float = 0.0
    targets: int = 0
    checkpoint: Path | None = None


class Session:
    """Optimizers, DDP wrappers or FSDP shards and the sampler of ``job``, and the bookkeeping after each step."""

    def __init__(self, job: "TrainJob") -> None:
        self.job = job
        tc = job.train
        wait_for_writes()  # a checkpoint still being written (of a run before) may hold these very tensors
        for player in job.players:
            player.model.to(job.device)
            player.objective.state.to(job.device)
        self.sharded: list[torch.nn.Module] = []  # the FSDP roots (train.parallel=fsdp with several processes)
        if tc.parallel == "fsdp" and job.topology.enabled:
            self.sharded = fsdp.sharded_roots(job.players, tc, job.device, job.topology.world_size)
        for player in job.players:
            player.build_optimizer(tc)
        self.sampler = job.sampler(n=len(job.examples), batch_size=tc.micro_batch_size, seed=job.seed,
                                   shuffle=tc.shuffle, rank=job.topology.rank, world_size=job.topology.world_size,
                                   group_size=job.group_size)
        self.ckpt_root = job.run_dir / "checkpoints"
        self.run_id = job.run_id
        self.seconds_before = 0.0  # training seconds of the sessions before this one (a resumed run)
        self.start_step = self._restore() if job.resume else 0
        self.forwards = {p.name: self._wrapped(p.objective.forward) for p in job.players}
        self.autocast = autocast(tc.precision, job.device)  # one reusable context for every forward
        self.metrics = MetricsLog(job.run_dir / "metrics.jsonl", resume_step=self.start_step if job.resume else None,
                                  trackers=tc.trackers, run_name=job.run_name, enabled=job.topology.is_main)
        self.progress = Progress(total=tc.steps, start=self.start_step, enabled=job.topology.is_main, log=job.log,
                                unit=job.unit, every=tc.log_every)
        self.step_times: list[float] = []
        self.teacher_times: list[float] = []
        self.losses: list[float] = []
        self.total_targets = 0
        self.last_ckpt = latest_checkpoint(self.ckpt_root)
        self.t_start = time.perf_counter()
        for player in job.players:
            player.model.train()

    @classmethod
    def start(cls, job: "TrainJob") -> "Session":
        return cls(job)

    def _wrapped(self, forward: torch.nn.Module) -> torch.nn.Module:
        if not self.job.topology.enabled or self.sharded:  # one process, or sharded in place
            return forward
        device_ids = [self.job.device.index] if self.job.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)

    def _restore(self) -> int:
        found = latest_checkpoint(self.ckpt_root)
        if found is None:
            self.job.log(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from step 0")
            return 0
        theirs = checkpoint_run_id(found)
        if self.run_id is not None and theirs is not None and theirs != self.run_id:
            raise ValueError(f"--resume: checkpoint {found} belongs to run {theirs}, not to this run ({self.run_id}); "
                             "start a new run name, or --overwrite to start the run folder again")
        players = self.job.players
        weights, state = load_checkpoint(found, [n for p in players for n in (p.name, f"{p.name}.objective")])
        for p in players:  # whole tensors, cut to this process's shards under FSDP
            fsdp.load_model_state(p.model, weights[p.name])
            p.objective.state.load_state_dict(weights[f"{p.name}.objective"])
            p.optimizer.load_state_dict(fsdp.shard_optimizer_state(state["players"][p.name]["optimizer"], p.optimizer))
            p.scheduler.load_state_dict(state["players"][p.name]["scheduler"])
            if p.after_update is not None:  # e.g. fixed sparsity masks, after the optimizer state is back
                p.after_update()
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.seconds_before = float(state.get("train_s", 0.0))
        self.job.log(f"resumed from {found} at step {int(state['step'])}")
        return int(state["step"])

    def where(self) -> str:
        return f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written yet"

    def finish_step(self, step: int, record: dict[str, Any], seconds: float) -> None:
        """Timings, the method's metrics, periodic evaluation, the metrics record, progress and checkpoint."""
        job, tc = self.job, self.job.train
        record.update(step_s=seconds, targets_per_s=record["targets"] / seconds,
                      train_s=self.seconds_before + time.perf_counter() - self.t_start)
        self.step_times.append(seconds)
        self.teacher_times.append(record["teacher_s"])
        self.losses.append(record["loss"])
        self.total_targets += record["targets"]
        if job.metrics is not None:
            record.update(job.metrics())
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            with contextlib.ExitStack() as whole:  # evaluation (process 0's) calls the model itself: every
                for root in self.sharded:  # process gathers every weight, whichever evaluates
                    whole.enter_context(fsdp.gathered(root))
                if job.evaluate is not None:
                    record.update({f"eval/{k}": v for k, v in job.evaluate(job.players[0].model).items()})
            job.players[0].model.train()
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            self.metrics.log(record)
        generating = any(p.replace_batches is not None for p in job.players)
        self.progress.update(step + 1, record["loss"], record["targets_per_s"],
                             record["generate_s"] / seconds if generating else None)
        if (tc.save_every and (step + 1) % tc.save_every == 0) or step + 1 == tc.steps:
            if job.topology.is_main or self.sharded:  # sharded: every process takes part in gathering
                self._save(step + 1)
            job.topology.barrier()

    def _save(self, step: int) -> None:
        """Write checkpoint ``step`` from process 0; under FSDP every process calls it (the whole weights and
        optimizer state are gathered to process 0 first, :func:`stillroom.train.fsdp.gather_full`)."""
        players, main = self.job.players, self.job.topology.is_main
        weights = {}
        for p in players:
            weights[p.name] = p.model.state_dict(keep_vars=True)  # the parameters themselves: tied ones stay one
            weights[f"{p.name}.objective"] = p.objective.state.state_dict()
        optimizers = {p.name: p.optimizer.state_dict() for p in players}
        if self.sharded:
            weights, optimizers = fsdp.gather_full((weights, optimizers), keep=main)
        if not main:
            return
        train_state = {
            "step": step, "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "train_s": self.seconds_before + time.perf_counter() - self.t_start,
            "players": {p.name: {"optimizer": optimizers[p.name], "scheduler": p.scheduler.state_dict()}
                        for p in players},
        }
        if self.run_id is not None:
            train_state["run_id"] = self.run_id
        final = step == self.job.train.steps and self.job.final_save_in_background and not self.job.topology.enabled
        self.last_ckpt = save_checkpoint(self.ckpt_root, step, weights=weights, train_state=train_state,
                                         keep=self.job.train.keep_checkpoints, background=final)

    def close(self) -> TrainResult:
        self.progress.close()
        self.metrics.close()
        for player in self.job.players:  # a remote teacher's HTTP sessions and its resume cache's lock
            close = getattr(getattr(player.objective, "teacher", None), "close", None)
            if close is not None:
                close()
        for root in self.sharded:  # process 0 alone evaluates and saves the trained models next
            fsdp.gather_for_good(root)
        for player in self.job.players:
            player.model.eval()
        return TrainResult(
            steps=self.job.train.steps, final_loss=self.losses[-1] if self.losses else float("nan"),
            losses=self.losses, train_seconds=time.perf_counter() - self.t_start,
            median_step_s=statistics.median(self.step_times) if self.step_times else 0.0,
            median_teacher_s=statistics.median(self.teacher_times) if self.teacher_times else 0.0,
            targets=self.total_targets,  # process 0 knows its own (maybe still being written); the others read it
            checkpoint=self.last_ckpt if self.job.topology.is_main else latest_checkpoint(self.ckpt_root),
        )
