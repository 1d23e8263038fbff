"""The generative teacher: a denoiser folder, or trained here once on the data and cached.

Without ``generative.teacher.path`` the teacher is trained through the one loop
(:func:`stillroom.train.loop.train`, one player with :class:`~.objectives.DenoisingObjective` on the data,
condition dropout ``cond_dropout`` so guidance works) and kept in
``<cache_dir>/generative_teachers/<key>/`` (``denoiser.json``, weights, ``teacher.json`` with its settings and
final loss, ``metrics.jsonl``). ``key`` hashes the settings, the data and the seed; the folder appears whole
or not at all (:func:`stillroom.models.cached.build_once`), and training it leaves the global RNG as it was,
so a run goes on exactly as with a cached teacher.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.core import TrainConfig
from stillroom.config.generative import GenerativeConfig, GenTeacherConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.data import GenSplits, collate_samples
from stillroom.domains.generative.models import (
    DENOISER_FILE, Denoiser, build_denoiser, load_denoiser, write_denoiser_files,
)
from stillroom.domains.generative.objectives import DenoiseForward, DenoisingObjective
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
"""Bumped when how a teacher is trained here changes (part of the cache key)."""


def teacher_key(tc: GenTeacherConfig, data: GenSplits, seed: int) -> str:
    """16 hex digits of the SHA-256 of the teacher's settings (not its sampling ones), the data and the seed."""
    settings = tc.model_dump(mode="json", exclude={"path", "sample_steps", "guidance", "seed"})
    payload = {"version": RECIPE_VERSION, "settings": settings, "seed": seed, "data": data.fingerprint()}
    return settings_key(payload)


def teacher_convention(tc: GenTeacherConfig) -> Convention:
    return Convention(**tc.convention.model_dump())


def generative_teacher(sec: GenerativeConfig, data: GenSplits, *, seed: int, cache_dir: str | None,
                       device: torch.device, topology: Topology, log: Log) -> tuple[Denoiser, str]:
    """``(teacher in eval mode on device, where it comes from)`` (see the module docstring)."""
    tc = sec.teacher
    if tc.path is not None:
        model = load_denoiser(Path(tc.path), "generative.teacher.path")
        origin = f"{model.describe()} loaded from {tc.path}"
    else:
        teacher_seed = tc.seed if tc.seed is not None else seed
        folder = cache_root(cache_dir) / "generative_teachers" / teacher_key(tc, data, teacher_seed)
        if not build_once(folder, complete=_complete, topology=topology,
                          build=lambda tmp: _train_teacher(tc, data, teacher_seed, folder, tmp, device, log)):
            log(f"teacher: cached denoiser {folder}")
        model = load_denoiser(folder, "cached generative teacher")
        record = json.loads((folder / "teacher.json").read_text())
        origin = (f"{model.describe()} trained here for {tc.steps} steps (seed {teacher_seed}, final loss "
                  f"{record['final_train_loss']:.4f}), cached in {folder}")
    check_fits(model, data, "generative.teacher.path" if tc.path else "generative.teacher")
    return model.to(device).eval().requires_grad_(False), origin


def check_fits(model: Denoiser, data: GenSplits, where: str) -> None:
    """Refuse a denoiser whose sample shape or class count differs from the data's, naming ``where``."""
    if tuple(model.sample_shape()) != tuple(data.sample_shape):
        raise ValueError(f"{where}: the denoiser makes samples of shape {list(model.sample_shape())}, the data set "
                         f"{data.name}'s are {list(data.sample_shape)}; use a denoiser built for this data set")
    if model.num_classes != data.num_classes:
        raise ValueError(f"{where}: the denoiser knows {model.num_classes} classes, the data set {data.name} has "
                         f"{data.num_classes}; use a denoiser trained on these classes")


def _complete(folder: Path) -> bool:
    return (folder / DENOISER_FILE).is_file() and (folder / "teacher.json").is_file()


def teacher_train_config(tc: GenTeacherConfig, device: torch.device) -> TrainConfig:
    """The loop settings of a teacher trained here: AdamW, warm-up then cosine to 10%, fp32, clip 1.0."""
    return TrainConfig(steps=tc.steps, micro_batch_size=tc.batch_size, lr=tc.lr, weight_decay=0.0,
                       warmup_steps=min(tc.warmup_steps, tc.steps - 1), schedule="cosine", precision="fp32",
                       device=str(device), keep_checkpoints=1, log_every=max(1, tc.steps // 10))


def _train_teacher(tc: GenTeacherConfig, data: GenSplits, seed: int, folder: Path, tmp: Path,
                   device: torch.device, log: Log) -> None:
    model = build_denoiser(tc.arch.kind, tc.arch.as_json(data.sample_shape),
                           num_classes=data.num_classes, convention=teacher_convention(tc),
                           seed=derive_seed(seed, "generative-teacher"))
    log(f"teacher: training {model.describe()} for {tc.steps} steps into {folder}")
    player = Player("teacher", model, DenoisingObjective(DenoiseForward(model, tc.cond_dropout)))
    job = TrainJob(train=teacher_train_config(tc, device), seed=seed, run_dir=tmp, run_name=f"teacher-{folder.name}",
                   players=[player], examples=data.train, collate=collate_samples, topology=Topology(),
                   device=device, sampler=ExampleSampler, log=log, unit="smp")
    t0 = time.perf_counter()
    result = train_apart(job, seed=derive_seed(seed, "generative-teacher-noise"))
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    write_denoiser_files(model.cpu(), tmp, extra={"trained_by": "stillroom generative teacher"})
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "dataset": data.name,
              "train_samples": len(data.train), "final_train_loss": result.final_loss,
              "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: trained in {record['train_seconds']} s, final loss {result.final_loss:.4f}")
