"""The ``masked_diffusion`` domain: a small masked-diffusion LM, self-distilled to decode in fewer steps.

Why a domain: the model is bidirectional (``BertForMaskedLM`` over value tokens, a separator and ``[MASK]``), it
generates by unmasking (:mod:`.sampling`), its data are its own answers, and the report measures accuracy against
decoding steps (:mod:`.evaluate`); none of that is the causal language-model domain's. The loop, players,
checkpoints, exact resume, run folder and report layout are the core's.

``prepare``: the task (:mod:`.task`), the base model (loaded, or trained here once and cached: :mod:`.base`), its
slow-sampler answers to the training prompts (cached: :mod:`.selfdata`), and the student, a copy of the base
model. ``method: dparallel`` trains it with certainty forcing; ``sft`` (and ``baseline: true``) with the same
masks and cross-entropy alone (beta 0): the CE-only self-distillation the spec compares against. The report's
``teacher`` row is the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.domains.masked_diffusion.base import base_model
from stillroom.domains.masked_diffusion.evaluate import model_metrics, write_decoding
from stillroom.domains.masked_diffusion.selfdata import self_distilled
from stillroom.domains.masked_diffusion.task import MdSplits, build_task, make_collate
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods.dparallel import certainty_player
from stillroom.models.masked_diffusion import load_mdlm, special_ids
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import TrainJob

Log = Callable[[str], None]
METHODS = ("dparallel", "sft")


def check_method(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"method={name} does not train masked-diffusion LMs; domain: masked_diffusion takes method "
                         f"{', '.join(METHODS)}")


@dataclass
class MaskedDiffusionRun:
    """A masked-diffusion run's models and data, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: nn.Module
    student: nn.Module
    data: MdSplits
    base_origin: str

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` on the self-distilled answers: dParallel's players, or (``sft``, the baseline) the same
        masks with cross-entropy alone."""
        cfg, sec = self.cfg, self.cfg.masked_diffusion
        check_method(method.name)
        if method.ce_only:
            player = certainty_player(model, mask_id=special_ids(sec.task.values)[1], block_size=sec.block_size,
                                      seed=cfg.seed, beta=0.0)
            plan = MethodPlan(players=lambda student: [player])
        else:
            plan = method.plan(MethodContext(
                cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=None, teacher_model=None,
                vocab_size=sec.task.values + 2, topology=self.topology, mix=None, log=log))
        plan = dataclasses.replace(plan, report=write_decoding)
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=plan.players(None),
            examples=self.data.train, collate=make_collate(self.data.task.answer_start), topology=self.topology,
            device=self.device, sampler=ExampleSampler, group_size=1, metrics=plan.metrics, resume=resume, log=log,
            unit="ex")
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model the decoding sweep of :mod:`.evaluate`."""
        out = {}
        for name, (model, _) in models.items():
            out[name] = model_metrics(model.to(self.device), self.cfg.masked_diffusion, self.data, self.device)
            m = out[name]
            log(f"eval {name}: accuracy {m['accuracy']:.4f} in {self.data.task.length} steps; threshold "
                f"{self.cfg.masked_diffusion.eval.threshold:g}: accuracy {m['threshold_accuracy']:.4f} at "
                f"{m['tokens_per_step']:.2f} tokens/step")
        return out

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """``save_pretrained`` (safetensors) into a temporary folder, then renamed."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{folder.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(model).cpu().save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)

    def load_model(self, folder: Path) -> nn.Module:
        task = self.data.task
        return load_mdlm(folder, task.values, task.positions, "model folder")

    def report_notes(self) -> list[str]:
        sec = self.cfg.masked_diffusion
        return [*self.data.notes(), f"teacher: the base model, {self.base_origin}",
                "student: a copy of the base model, trained on its own answers",
                f"decoding: blocks of {sec.block_size}; accuracy / exact_match: the slow sampler at 1 token per step "
                f"({self.data.task.length} steps); threshold_*: the entropy-threshold decoder at "
                f"{sec.eval.threshold:g} nats; tokens_per_step = R / mean steps; the full sweep: decoding.md"]


class MaskedDiffusionDomain:
    name = "masked_diffusion"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> MaskedDiffusionRun:
        """Build the task, load or train (once) the base model, decode its self-distillation data (once), copy it
        into the student."""
        check_method(method.name)
        sec = cfg.masked_diffusion
        device = resolve_device(cfg.train.device, topology)
        task, data = build_task(sec.task)
        log(task.describe())
        base, origin = base_model(sec, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                  topology=topology, log=log)
        log(f"base model: {origin}")
        data, record = self_distilled(sec, data, base, cache_dir=cfg.cache_dir, device=device, topology=topology,
                                      log=log)
        log(data.about[-1])
        base.eval().requires_grad_(False)
        student = copy.deepcopy(base).requires_grad_(True).train()
        return MaskedDiffusionRun(cfg, topology, device, base, student, data, origin)
