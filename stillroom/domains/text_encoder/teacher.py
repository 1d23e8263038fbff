"""The teacher of text ``self_distill_fpt``: a further-pre-trained BERT folder, or theta_0 further pre-trained here.

Without ``mlm.teacher.path`` the teacher is ``mlm.teacher.init_path`` (theta_0) trained with the MLM loss
alone through the one loop (one player, :class:`~.mlm.MlmObjective`) on the run's training texts, then kept
in ``<cache_dir>/mlm_teachers/<key>/`` (a BertForMaskedLM folder with its tokenizer, plus
``mlm_teacher.json``). ``key`` hashes the settings, theta_0's weights, the texts, the masking and the seed;
:func:`~stillroom.models.cached.build_once` makes the folder appear complete or not at all.
"""

from __future__ import annotations

import functools
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
from stillroom.config.mlm import BUILTIN_MINILM, MlmConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.text_encoder.data import TextSplits, collate_text
from stillroom.domains.text_encoder.mlm import MaskSpec, MlmForward, MlmObjective, heldout_mlm_loss
from stillroom.domains.text_encoder.models import describe, load_masked_lm, resolve_folder, save_folder
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
RECORD = "mlm_teacher.json"


def _weights_digest(path: str) -> str:
    """SHA-256 of theta_0's ``model.safetensors`` (a changed theta_0 trains a new teacher)."""
    folder = resolve_folder(path, "mlm.teacher.init_path")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"mlm.teacher.init_path={path}: no model.safetensors there; give a BERT folder")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def teacher_key(sec: MlmConfig, data: TextSplits, seed: int) -> str:
    """16 hex digits of the SHA-256 of the teacher's settings, theta_0, the texts, the masking and the seed."""
    t = sec.teacher
    payload = {"version": RECIPE_VERSION, "settings": t.model_dump(mode="json", exclude={"path", "seed", "init_path"}),
               "init": _weights_digest(t.init_path), "seed": seed, "mask_prob": sec.mask_prob,
               "seq_len": sec.seq_len, "train": [e.uid for e in data.train],
               "texts": hashlib.sha256("\n".join(e.text for e in data.train).encode()).hexdigest()}
    return settings_key(payload)


def mlm_teacher(sec: MlmConfig, data: TextSplits, tokenizer, *, seed: int, cache_dir: str | None,
                device: torch.device, topology: Topology, log: Log) -> tuple[nn.Module, str]:
    """``(teacher in eval mode on device, no grad, where it comes from)`` (see the module docstring)."""
    t = sec.teacher
    if t.path is not None:
        model, how = load_masked_lm(t.path, "mlm.teacher.path", seed=derive_seed(seed, "mlm-teacher-head"))
        origin = f"{describe(model)}, {how}"
    else:
        seed = t.seed if t.seed is not None else seed
        folder = cache_root(cache_dir) / "mlm_teachers" / teacher_key(sec, data, seed)
        if not build_once(folder, complete=lambda f: (f / RECORD).is_file(), topology=topology,
                          build=lambda tmp: _train(sec, data, tokenizer, seed, folder, tmp, device, log)):
            log(f"teacher: cached MLM teacher {folder}")
        model, _ = load_masked_lm(str(folder), "the cached MLM teacher", seed=0)
        record = json.loads((folder / RECORD).read_text())
        origin = (f"{describe(model)}, further pre-trained from {t.init_path} here for {t.steps} steps (seed {seed}, "
                  f"held-out MLM loss {record['heldout_mlm_loss']:.4f}), cached in {folder}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval(), origin


def _train(sec: MlmConfig, data: TextSplits, tokenizer, seed: int, folder: Path, tmp: Path, device: torch.device,
           log: Log) -> None:
    """MLM-train theta_0 through the loop into ``tmp`` (renamed to ``folder`` by :func:`build_once`)."""
    t = sec.teacher
    model, how = load_masked_lm(t.init_path or BUILTIN_MINILM, "mlm.teacher.init_path",
                                seed=derive_seed(seed, "mlm-teacher-head"))
    model.to(device).train()
    log(f"teacher: further pre-training theta_0 ({how}) with the MLM loss for {t.steps} steps into {folder}")
    spec = MaskSpec.of(tokenizer, model.config.vocab_size, sec.mask_prob)
    tc = TrainConfig(steps=t.steps, micro_batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                     warmup_steps=t.warmup_steps, schedule="linear", min_lr_ratio=0.0, precision="fp32",
                     device=str(device), keep_checkpoints=1, log_every=50, betas=(0.9, 0.95))
    job = TrainJob(train=tc, seed=seed, run_dir=tmp / "training", run_name=f"mlm-teacher-{folder.name}",
                   players=[Player("teacher", model, MlmObjective(MlmForward(model, spec, seed)))],
                   examples=data.train, collate=functools.partial(collate_text, pad_id=tokenizer.pad_token_id),
                   topology=Topology(), device=device, sampler=ExampleSampler, log=log, unit="seq")
    t0 = time.perf_counter()
    result = train_apart(job, seed=derive_seed(seed, "mlm-teacher-dropout"))
    shutil.rmtree(tmp / "training" / "checkpoints", ignore_errors=True)
    model_dir = tmp / "model"
    save_folder(model, tokenizer, model_dir)
    for path in model_dir.iterdir():
        os.replace(path, tmp / path.name)
    model_dir.rmdir()
    record = {"settings": t.model_dump(mode="json"), "seed": seed, "dataset": data.source,
              "train_texts": len(data.train), "final_loss": result.final_loss,
              "heldout_mlm_loss": heldout_mlm_loss(model, data.heldout, spec, seed, sec.eval_batch_size,
                                                   tokenizer.pad_token_id),
              "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
