"""The training loop. Read it top to bottom; nothing important happens in hooks.

One optimizer step:
  1. draw ``grad_accum`` micro-batches for this process (the sampler splits each
     global micro-batch across processes);
  2. count the target tokens of all of them, summed over processes: ``N``;
  3. for each micro-batch: teacher signal (no grad), student forward, loss mix
     -> ``(sum, count)``; backward of ``sum * world_size / N`` (DDP averages
     gradients over processes, so the factor makes the result the gradient of
     ``total sum / N``: 1x8, 4x2 and 8x1 accumulation, and 1 or 2 processes,
     give the same gradient);
  4. stop on a non-finite loss; clip; step; schedule; log; evaluate; checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Batch, Example, collate
from stillroom.losses import LossMix, StudentOutput
from stillroom.models import decoder_body, output_head, use_eager_attention
from stillroom.models.precision import autocast
from stillroom.teachers.signal import TeacherSignal
from stillroom.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from stillroom.train.distributed import Topology
from stillroom.train.metrics import MetricsLog
from stillroom.train.schedule import build_optimizer


class TeacherSource(Protocol):
    def signal(self, batch: Batch) -> TeacherSignal: ...


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    median_step_s: float = 0.0
    median_teacher_s: float = 0.0
    target_tokens: int = 0
    checkpoint: Path | None = None


class _SlicedHead(torch.nn.Module):
    """The output head restricted to the first ``vocab`` rows (padding rows dropped), sharing storage."""

    def __init__(self, head: torch.nn.Linear, vocab: int):
        super().__init__()
        self.head = head
        self.vocab = vocab

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight[: self.vocab]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.head.bias is None else self.head.bias[: self.vocab]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class StudentForward(torch.nn.Module):
    """The student's forward pass as one module (what DDP wraps).

    Returns a dict: ``hidden`` (last hidden state after the final norm, fused
    path) or ``logits`` (plain path), plus ``hs_<i>`` hidden states asked for.
    """

    def __init__(self, model: torch.nn.Module, *, fused: bool, hidden_layers: list[int], vocab: int,
                 attentions: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused
        self.hidden_layers = hidden_layers
        self.vocab = vocab
        self.attentions = attentions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      output_hidden_states=bool(self.hidden_layers), output_attentions=self.attentions)
        if self.fused:
            out = decoder_body(self.model)(**kwargs)
            result = {"hidden": out.last_hidden_state}
        else:
            out = self.model(**kwargs)
            result = {"logits": out.logits[..., : self.vocab]}
        for i in self.hidden_layers:
            result[f"hs_{i}"] = out.hidden_states[i]
        if self.attentions:
            for i, a in enumerate(out.attentions):
                result[f"att_{i}"] = a
        return result


def forward_backward(
    micro: list[Batch],
    *,
    forward: torch.nn.Module,
    head: torch.nn.Module | None,
    mix: LossMix,
    teacher: TeacherSource | None,
    device: torch.device,
    precision: str,
    scale: float,
    ddp: bool = False,
) -> tuple[float, float, dict[str, float]]:
    """Accumulate the gradient of ``scale * sum of the loss sums`` over ``micro``.

    Returns the (unscaled) loss sum, the seconds spent in the teacher, and the
    per-term sums. With ``scale = world_size / global_target_count`` the result
    is independent of how the tokens are split into micro-batches and processes.
    """
    loss_sum, teacher_s = 0.0, 0.0
    parts: dict[str, float] = {}
    for j, batch in enumerate(micro):
        batch = batch.to(device)
        signal = None
        if mix.needs_teacher:
            t_teacher = time.perf_counter()
            signal = teacher.signal(batch)
            teacher_s += time.perf_counter() - t_teacher
        sync = forward.no_sync() if ddp and j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(precision, device):
                out = forward(batch.input_ids, batch.attention_mask)
            student = StudentOutput(
                logits_btv=out.get("logits"), hidden_btd=out.get("hidden"), head=head,
                hidden_states={i: out[f"hs_{i}"] for i in mix.student_hidden_layers},
                attentions={int(k[4:]): v for k, v in out.items() if k.startswith("att_")},
            )
            result = mix(student, signal, batch.target_ids, batch.loss_mask, batch.target_weight)
            (result.total * scale).backward()
        loss_sum += float(result.total.detach())
        for k, v in result.parts.items():
            parts[k] = parts.get(k, 0.0) + v
    return loss_sum, teacher_s, parts


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    model: torch.nn.Module,
    train_examples: list[Example],
    pad_id: int,
    vocab_size: int,
    mix: LossMix,
    teacher: TeacherSource | None,
    topology: Topology,
    resume: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    sampler_factory: Callable[..., object],
    prepare_batches: Callable[[list[Batch], int], list[Batch]] | None = None,
    method_state: Callable[[], dict] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` for ``cfg.train.steps`` optimizer steps (see the module docstring).

    ``prepare_batches(micro_batches, step)``, when given, may replace the sampled
    micro-batches (on-policy methods put student generations there); its time is
    logged as ``generate_s``. It must draw randomness only from state it
    checkpoints itself, or from torch's global RNG (which checkpoints restore).
    ``method_state()``, when given, adds the method's per-step metrics to the record.
    """
    tc = cfg.train
    device = torch.device(tc.device)
    model.to(device)
    mix.to(device)
    if mix.needs_teacher and teacher is None:
        raise ValueError("the loss terms need a teacher, but no teacher source was built")

    # ---- the pieces that carry state -------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad] + [p for p in mix.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(trainable, tc)
    sampler = sampler_factory(
        n=len(train_examples), batch_size=tc.micro_batch_size, seed=cfg.seed, shuffle=tc.shuffle,
        rank=topology.rank, world_size=topology.world_size,
    )
    ckpt_root = run_dir / "checkpoints"
    start_step = 0
    if resume:
        found = latest_checkpoint(ckpt_root)
        if found is None:
            log(f"--resume: no complete checkpoint in {ckpt_root}; starting from step 0")
        else:
            model_state, loss_state, state = load_checkpoint(found)
            model.load_state_dict(model_state)
            mix.load_state_dict(loss_state)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            start_step = int(state["step"])
            log(f"resumed from {found} at step {start_step}")

    fused = cfg.loss.fused and mix.needs_logits
    if mix.needs_attentions:
        use_eager_attention(model)
    forward = StudentForward(model, fused=fused, hidden_layers=mix.student_hidden_layers, vocab=vocab_size,
                             attentions=mix.needs_attentions)
    if topology.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    head = _SlicedHead(output_head(model), vocab_size) if fused else None

    metrics = MetricsLog(
        run_dir / "metrics.jsonl", resume_step=start_step if resume else None, trackers=tc.trackers,
        run_name=cfg.name, enabled=topology.is_main,
    )
    progress = _Progress(total=tc.steps, start=start_step, enabled=topology.is_main, log=log)
    step_times: list[float] = []
    teacher_times: list[float] = []
    losses: list[float] = []
    total_targets = 0
    last_ckpt = latest_checkpoint(ckpt_root)
    train_start = time.perf_counter()
    model.train()

    for step in range(start_step, tc.steps):
        t0 = time.perf_counter()
        micro = [collate([train_examples[i] for i in sampler.next_indices()], pad_id) for _ in range(tc.grad_accum)]
        gen_s = 0.0
        if prepare_batches is not None:  # the method decides where sequences come from (e.g. on-policy samples)
            t_gen = time.perf_counter()
            micro = prepare_batches(micro, step)
            gen_s = time.perf_counter() - t_gen
        global_targets = topology.all_reduce_sum(sum(b.num_targets for b in micro))
        if global_targets == 0:
            raise ValueError(f"step {step}: no target tokens in this step's batches; check data.format and masks")
        loss_sum, teacher_s, parts = forward_backward(
            micro, forward=forward, head=head, mix=mix, teacher=teacher, device=device,
            precision=tc.precision, scale=topology.world_size / global_targets, ddp=topology.enabled,
        )
        loss = topology.all_reduce_sum(loss_sum) / global_targets
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLoss(f"step {step}: the loss is {loss}; stopping ({where})")
        grad_norm = None
        if tc.clip_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.clip_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mix.after_step(loss, step, tc.steps)

        dt = time.perf_counter() - t0
        step_times.append(dt)
        teacher_times.append(teacher_s)
        losses.append(loss)
        total_targets += int(global_targets)
        record = {
            "step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "target_tokens": int(global_targets), "step_s": dt, "teacher_s": teacher_s, "generate_s": gen_s,
            "tokens_per_s": global_targets / dt,
        }
        record.update({f"loss/{k}": topology.all_reduce_sum(v) / global_targets for k, v in sorted(parts.items())})
        record.update(mix.log_state())
        if method_state is not None:
            record.update(method_state())
        if evaluate is not None and tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            record.update({f"eval/{k}": v for k, v in evaluate(model).items()})
            model.train()
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
            metrics.log(record)
        progress.update(step + 1, loss, record["tokens_per_s"], gen_s / dt if prepare_batches is not None else None)
        if (tc.save_every and (step + 1) % tc.save_every == 0) or step + 1 == tc.steps:
            if topology.is_main:
                last_ckpt = save_checkpoint(
                    ckpt_root, step + 1, model_state=model.state_dict(), loss_state=mix.state_dict(),
                    train_state={
                        "step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(), "rng": rng_state(),
                    },
                    keep=tc.keep_checkpoints,
                )
            topology.barrier()
    progress.close()
    metrics.close()
    model.eval()
    return TrainResult(
        steps=tc.steps, final_loss=losses[-1] if losses else float("nan"), losses=losses,
        train_seconds=time.perf_counter() - train_start,
        median_step_s=statistics.median(step_times) if step_times else 0.0,
        median_teacher_s=statistics.median(teacher_times) if teacher_times else 0.0,
        target_tokens=total_targets, checkpoint=latest_checkpoint(ckpt_root),
    )


class _Progress:
    """A rich progress bar on a terminal; a plain line every few steps otherwise (CI logs)."""

    def __init__(self, total: int, start: int, enabled: bool, log: Callable[[str], None] = print):
        self.enabled = enabled and total > start
        self.log = log
        self.total = total
        self.bar = None
        self.last_print = 0.0
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                TextColumn("{task.fields[gen]}"), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0, gen="")
            self.bar.start()

    def update(self, step: int, loss: float, tps: float, gen_share: float | None = None) -> None:
        """``gen_share``: fraction of the step spent preparing batches (on-policy generation)."""
        if not self.enabled:
            return
        gen = "" if gen_share is None else f"generate {100 * gen_share:.0f}% / train {100 * (1 - gen_share):.0f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps, gen=gen)
            return
        now = time.perf_counter()
        if now - self.last_print > 10 or step == self.total:
            self.last_print = now
            self.log(f"step {step}/{self.total} loss {loss:.4f} {tps:.0f} tok/s" + (f" {gen}" if gen else ""))
            sys.stdout.flush()  # CI logs are pipes: show progress as it happens

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
