"""The ``autoregressive`` domain: one-step generators of token sequences distilled from an autoregressive teacher.

Why a domain: the teacher is a causal LM over codebook ids (a Hugging Face ``LlamaForCausalLM``), the student a
generator of *continuous* tokens from noise in one pass, and the report measures exact total variation against
the teacher's enumerated joint (:mod:`.evaluate`); none of that is the language-model, classifier or denoiser
domain's. The loop, players, checkpoints, exact resume, run folder and report layout are the core's.

The toy's data and teacher (:mod:`.toy`, :mod:`.teacher`) are prepared here; the training method (``dd2``)
brings its players through :attr:`~stillroom.methods.base.MethodPlan.players`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.autoregressive.data import ArSplits, build_splits, collate_sequences
from stillroom.domains.autoregressive.evaluate import (
    eval_noise, generator_speed, generator_tokens, independent_tokens, teacher_speed, teacher_tokens, token_metrics,
)
from stillroom.domains.autoregressive.nets import CondDenoiser, build_net, load_net, save_net
from stillroom.domains.autoregressive import markov_eval
from stillroom.domains.autoregressive.teacher import ar_teacher, load_teacher, teacher_joint
from stillroom.domains.generative.toy_metrics import exact_tv
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import TrainJob

Log = Callable[[str], None]
MARKOV_METHODS = ("cfg_distill",)
"""The methods that train on ``dataset: markov_modes`` (the student is a copy of the conditional teacher)."""


def autoregressive_methods() -> tuple[str, ...]:
    from stillroom.methods import METHODS

    return tuple(sorted(n for n, m in METHODS.items() if m.domains is not None and "autoregressive" in m.domains))


def check_method(name: str) -> None:
    allowed = autoregressive_methods()
    if name not in allowed:
        raise ValueError(f"method={name} does not train one-step token generators; domain: autoregressive takes "
                         f"method {', '.join(allowed)}")


def check_markov_method(name: str) -> None:
    if name not in MARKOV_METHODS:
        raise ValueError(f"method={name} does not train on autoregressive.dataset: markov_modes; use method "
                         f"{', '.join(MARKOV_METHODS)} (or dataset: codebook)")


@dataclass
class AutoregressiveRun:
    """An autoregressive run's models and data, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: nn.Module
    student: CondDenoiser
    data: ArSplits
    teacher_origin: str
    _joint: torch.Tensor | None = field(default=None, repr=False)

    @property
    def teacher_probs(self) -> torch.Tensor:
        """``[V] * n`` float64: the teacher's exact joint (computed once)."""
        if self._joint is None:
            self._joint = teacher_joint(self.teacher_model, self.data.toy.vocab, self.data.toy.length, self.device)
        return self._joint

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train the generator ``model`` with ``method``'s players (the batches are training sequences; DD2 reads
        only their size and draws its own noise and teacher samples). markov_modes: the baseline (``sft``) continues
        the teacher's cross-entropy from the student's start."""
        cfg = self.cfg
        markov_ce = cfg.autoregressive.dataset == "markov_modes" and method.ce_only
        if markov_ce:
            plan = MethodPlan(players=lambda student: [markov_eval.ce_player(model, self.data.toy.vocab)])
        else:
            check_method(method.name)
            plan = method.plan(MethodContext(
                cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=None,
                teacher_model=self.teacher_model, vocab_size=self.data.toy.vocab, topology=self.topology, mix=None,
                log=log))
        if plan.players is None:
            raise ValueError(f"method={method.name} brings no players for domain: autoregressive")
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=plan.players(None),
            examples=self.data.train, collate=collate_sequences, topology=self.topology, device=self.device,
            sampler=ExampleSampler, group_size=1, metrics=plan.metrics, resume=resume, log=log, unit="tok",
        )
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model the metrics of :mod:`.evaluate`; the teacher brings the ``teacher_independent`` row (arm A);
        a group without the teacher gets a speed-only teacher row timed beside it."""
        sec, toy, out = self.cfg.autoregressive, self.data.toy, {}
        if sec.dataset == "markov_modes":
            out = markov_eval.markov_report({k: m.to(self.device) for k, (m, _) in models.items()}, toy, sec)
            log("eval: " + "; ".join(f"{k} Q {v['quality']:.3f} D {v['diversity']:.3f}" for k, v in out.items()))
            return out
        probs, n = self.teacher_probs, sec.eval.samples
        length = toy.length
        for name, (model, _) in models.items():
            model.to(self.device)
            if name == "teacher":
                out["teacher"] = {**token_metrics(teacher_tokens(probs, n, sec.eval.seed), probs, toy.probs),
                                  "teacher_tv_true": exact_tv(probs, toy.probs), "nfe": length,
                                  "samples_per_s": teacher_speed(model, sec, length, toy.vocab, self.device),
                                  "params": sum(p.numel() for p in model.parameters()), "samples": n}
                independent = independent_tokens(probs, n, sec.eval.seed)
                out["teacher_independent"] = {**token_metrics(independent, probs, toy.probs), "samples": n}
                log(f"eval teacher: exact TV to the true joint {out['teacher']['teacher_tv_true']:.4f}; "
                    f"independent marginals: joint TV {out['teacher_independent']['joint_tv']:.4f}")
                continue
            tokens = generator_tokens(model, eval_noise(sec, length), toy.codebook_vd, self.device)
            out[name] = {**token_metrics(tokens, probs, toy.probs), "nfe": 1,
                         "samples_per_s": generator_speed(model, sec, toy.codebook_vd, length, self.device),
                         "params": sum(p.numel() for p in model.parameters()), "samples": n}
            log(f"eval {name}: joint TV {out[name]['joint_tv']:.4f}, pair TV (q1,q2) {out[name]['pair_tv_12']:.4f}, "
                f"(q1,q4) {out[name]['pair_tv_14']:.4f}")
        if "teacher" not in models:
            out["teacher"] = {"samples_per_s": teacher_speed(self.teacher_model, sec, length, toy.vocab, self.device)}
        return out

    def save_model(self, model: nn.Module, folder: Path) -> None:
        if self.cfg.autoregressive.dataset == "markov_modes":
            return markov_eval.save_lm(model, folder)
        save_net(model, folder, extra={"codebook": self.data.toy.codebook_vd.tolist(),
                                       "note": "generate(eps [B, 4, 2]) -> continuous tokens; snap to the codebook"})

    def load_model(self, folder: Path) -> nn.Module:
        if self.cfg.autoregressive.dataset == "markov_modes":
            return load_teacher(folder, self.data.toy.vocab, "model folder", self.data.toy.extra_ids)
        return load_net(folder, "model folder")

    def report_notes(self) -> list[str]:
        sec = self.cfg.autoregressive
        if sec.dataset == "markov_modes":
            return [*self.data.notes(), f"teacher: {self.teacher_origin}", "student: a copy of the teacher, "
                    "trained to sample without CFG", markov_eval.markov_notes(sec)]
        return [*self.data.notes(), f"teacher: {self.teacher_origin}",
                f"student: one-step generator ({self.student.describe()}); its continuous tokens are snapped to the "
                "nearest codeword",
                f"joint_tv / pair_tv_12 / pair_tv_14: exact TV of {sec.eval.samples} sampled sequences' empirical "
                "joint (pairwise marginals (q1,q2), (q1,q4)) to the teacher's enumerated joint; tv_true: to the "
                "true joint; teacher_tv_true: the teacher's exact joint to the true joint; the teacher row samples "
                "its exact joint (the sampling-noise floor); teacher (independent): each position from the teacher's "
                "marginal (arm A)"]


class AutoregressiveDomain:
    name = "autoregressive"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> AutoregressiveRun:
        """Build the toy and its sequences, load or train (once) the teacher, build the generator."""
        check_method(method.name)
        sec = cfg.autoregressive
        device = resolve_device(cfg.train.device, topology)
        data = build_splits(sec)
        log(data.notes()[1])
        teacher, origin = ar_teacher(sec.teacher, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                     topology=topology, log=log)
        log(f"teacher: {origin}")
        if sec.dataset == "markov_modes":
            check_markov_method(method.name)
            return AutoregressiveRun(cfg, topology, device, teacher, markov_eval.markov_student(teacher), data, origin)
        student = build_net(sec.generator.model_dump(), derive_seed(cfg.seed, "autoregressive-generator"))
        return AutoregressiveRun(cfg, topology, device, teacher, student.to(device).train(), data, origin)
