"""The MAE teacher of ``dmae`` / ``self_distill_fpt``: loaded from a folder, or MAE-pre-trained here once and cached.

Without ``mae.teacher.path`` the teacher is trained with the MAE loss alone through the one loop (one
player, :class:`~.mae.MaeObjective`), starting from ``mae.teacher.init_path`` (further pre-training of
theta_0: self_distill_fpt) or from ``mae.teacher.arch``, then kept in
``<cache_dir>/mae_teachers/<key>/`` (``config.json`` + ``model.safetensors``, ``mae_teacher.json``).
``key`` hashes the settings, the initial weights, the data, the mask settings and the seed. The folder
is trained in ``.tmp-<key>-<pid>/`` and renamed into place when complete, as classifier teachers are
(:mod:`.teacher`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.core import TrainConfig
from stillroom.config.mae import MaeConfig, MaeTeacherConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageSplits, collate_images
from stillroom.domains.vision.hf_models import build_vit_mae
from stillroom.domains.vision.mae import MaeForward, MaeObjective, heldout_mae_loss, load_mae, save_mae
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
RECORD = "mae_teacher.json"


def _weights_digest(folder: str) -> str:
    """SHA-256 of an MAE folder's ``model.safetensors`` (so a changed theta_0 trains a new teacher)."""
    path = Path(folder).expanduser() / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"mae.teacher.init_path={folder}: no model.safetensors there; give an MAE folder")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def teacher_key(sec: MaeConfig, data: ImageSplits, seed: int) -> str:
    """16 hex digits of the SHA-256 of the teacher's settings, its start, the data, the masking and the seed."""
    t = sec.teacher
    payload = {"version": RECIPE_VERSION, "settings": t.model_dump(mode="json", exclude={"path", "seed", "init_path"}),
               "init": _weights_digest(t.init_path) if t.init_path else None, "seed": seed,
               "mask_ratio": sec.mask_ratio, "norm_pix_loss": sec.norm_pix_loss, "shift": sec.shift,
               "data": data.dataset.fingerprint(), "train": [e.uid for e in data.train]}
    return settings_key(payload)


def mae_teacher(sec: MaeConfig, data: ImageSplits, *, seed: int, cache_dir: str | None, device: torch.device,
                topology: Topology, log: Log) -> tuple[nn.Module, str]:
    """``(teacher in eval mode on device, no grad, where it comes from)`` (see the module docstring)."""
    t = sec.teacher
    if t.path is not None:
        model = load_mae(t.path, "mae.teacher.path")
        origin = f"loaded from {t.path}"
    else:
        seed = t.seed if t.seed is not None else seed
        folder = cache_root(cache_dir) / "mae_teachers" / teacher_key(sec, data, seed)
        if not build_once(folder, complete=lambda f: (f / RECORD).is_file(), topology=topology,
                          build=lambda tmp: _train(sec, data, seed, folder, tmp, device, log)):
            log(f"teacher: cached MAE teacher {folder}")
        model = load_mae(folder, "the cached MAE teacher")
        record = json.loads((folder / RECORD).read_text())
        start = f"further pre-trained from {t.init_path}" if t.init_path else "MAE-pre-trained from scratch"
        origin = (f"ViTMAE d {model.config.hidden_size}, {model.config.num_hidden_layers} blocks, {start} here for "
                  f"{t.steps} steps (seed {seed}, held-out MAE loss {record['heldout_mae_loss']:.4f}), cached in {folder}")
    model.config.mask_ratio, model.config.norm_pix_loss = sec.mask_ratio, sec.norm_pix_loss
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), origin


def initial_teacher(t: MaeTeacherConfig, in_shape: tuple[int, int, int], seed: int) -> nn.Module:
    """The teacher before its pre-training: ``init_path`` loaded, or ``arch`` built from ``seed``."""
    if t.init_path is not None:
        return load_mae(t.init_path, "mae.teacher.init_path")
    a = t.arch
    return build_vit_mae(in_shape, patch_size=a.patch_size, hidden_size=a.hidden_size, layers=a.layers, heads=a.heads,
                         decoder_hidden_size=a.decoder_hidden_size, decoder_layers=a.decoder_layers,
                         decoder_heads=a.decoder_heads, seed=derive_seed(seed, "mae-teacher"))


def _train(sec: MaeConfig, data: ImageSplits, seed: int, folder: Path, tmp: Path, device: torch.device,
           log: Log) -> None:
    """MAE-pre-train the teacher through the loop into ``tmp`` (renamed to ``folder`` by :func:`build_once`)."""
    t = sec.teacher
    model = initial_teacher(t, data.dataset.in_shape, seed).train()
    model.config.mask_ratio, model.config.norm_pix_loss = sec.mask_ratio, sec.norm_pix_loss
    log(f"teacher: MAE-pre-training a teacher ({model.config.num_hidden_layers} blocks, d {model.config.hidden_size}) "
        f"for {t.steps} steps into {folder}")
    tc = TrainConfig(steps=t.steps, micro_batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                     warmup_steps=t.warmup_steps, schedule="cosine", precision="fp32", device=str(device),
                     keep_checkpoints=1, log_every=50, betas=(0.9, 0.95))
    job = TrainJob(train=tc, seed=seed, run_dir=tmp / "training", run_name=f"mae-teacher-{folder.name}",
                   players=[Player("teacher", model, MaeObjective(MaeForward(model, seed=seed, shift=sec.shift)))],
                   examples=data.train, collate=collate_images, topology=Topology(), device=device,
                   sampler=ExampleSampler, log=log, unit="img")
    t0 = time.perf_counter()
    result = train_apart(job)  # the run goes on exactly as with a cached teacher
    shutil.rmtree(tmp / "training" / "checkpoints", ignore_errors=True)
    model_dir = tmp / "model"
    save_mae(model, model_dir)
    for path in model_dir.iterdir():
        os.replace(path, tmp / path.name)
    model_dir.rmdir()
    record = {"settings": t.model_dump(mode="json"), "seed": seed, "dataset": data.dataset.name,
              "train_images": len(data.train), "final_loss": result.final_loss,
              "heldout_mae_loss": heldout_mae_loss(model, data.heldout, seed, sec.eval_batch_size),
              "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
