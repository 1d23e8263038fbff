"""The base masked-diffusion model: loaded from a folder, or trained here once through the one loop and cached.

Training (:class:`DiffusionPretrain`): LLaDA's objective on the task's correct training sequences
(:func:`~stillroom.models.masked_diffusion.masked_diffusion_loss`). The masks of a step are drawn in the player's
``replace_batches`` from ``(seed, step, micro-batch)`` on the CPU, so a batch carries them and the forward pass
is a plain function of it. The folder is ``<cache_dir>/masked_diffusion/base/<key>/`` (the key hashes the
settings, the task and the seed; :func:`stillroom.models.cached.build_once` makes it appear whole), written with
``save_pretrained`` (safetensors): ``AutoModelForMaskedLM.from_pretrained`` loads it without stillroom.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from stillroom.config.core import TrainConfig
from stillroom.config.masked_diffusion import MaskedDiffusionConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.masked_diffusion.task import MdBatch, MdSplits, make_collate
from stillroom.losses import LossResult
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.models.masked_diffusion import (
    build_mdlm, forward_mask, load_mdlm, masked_diffusion_loss, special_ids, token_logits,
)
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
BASE_RECORD = "base.json"


@dataclass
class NoisedBatch:
    """A clean batch with its forward-process draw: ``noisy [B, L]`` (masked answer tokens), ``masked [B, L]``,
    ``t [B]``."""

    clean: MdBatch
    noisy: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return self.clean.num_targets

    def to(self, device: torch.device | str) -> "NoisedBatch":
        return NoisedBatch(self.clean.to(device), self.noisy.to(device), self.masked.to(device), self.t.to(device))


def noise_batch(batch: MdBatch, values: int, eps: float, generator: torch.Generator) -> NoisedBatch:
    """``t ~ U(eps, 1)`` per row, each answer token masked with probability ``t`` (draws from ``generator``)."""
    t_b = eps + (1 - eps) * torch.rand(batch.tokens.shape[0], generator=generator)
    masked_bl = forward_mask(batch.answer_mask(), t_b, generator)
    noisy_bl = batch.tokens.masked_fill(masked_bl, special_ids(values)[1])
    return NoisedBatch(batch, noisy_bl, masked_bl, t_b)


class LogitsForward(nn.Module):
    """``NoisedBatch -> {"logits": [B, L, V]}`` of the noisy sequence (what distributed data parallel wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: NoisedBatch) -> dict[str, torch.Tensor]:
        return {"logits": token_logits(self.model, batch.noisy)}


class DiffusionPretrain:
    """The masked-diffusion objective as a loop objective (``count``: answer tokens)."""

    def __init__(self, model: nn.Module):
        self.forward, self.state = LogitsForward(model), nn.Module()

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: NoisedBatch, signal: Any) -> LossResult:
        total, count = masked_diffusion_loss(outputs["logits"], batch.clean.tokens, batch.masked, batch.t,
                                             batch.clean.answer_mask())
        return LossResult(total=total, count=count, parts={"mdlm": float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def pretrain_player(model: nn.Module, values: int, eps: float, seed: int) -> Player:
    """The base model's player: masks drawn per ``(seed, step, micro-batch)`` (exact resume)."""
    def noised(micro: list[MdBatch], step: int) -> list[NoisedBatch]:
        return [noise_batch(b, values, eps, torch.Generator().manual_seed(derive_seed(seed, "mdlm", step, j)))
                for j, b in enumerate(micro)]
    return Player("base", model, DiffusionPretrain(model), replace_batches=noised)


def base_model(sec: MaskedDiffusionConfig, data: MdSplits, *, seed: int, cache_dir: str | None,
               device: torch.device, topology: Topology, log: Log) -> tuple[nn.Module, str]:
    """``(base model on device, where it comes from)`` (see the module docstring)."""
    task = data.task
    if sec.base.path is not None:
        model = load_mdlm(Path(sec.base.path), task.values, task.positions, "masked_diffusion.base.path")
        return model.to(device), f"loaded from {sec.base.path}"
    base_seed = sec.base.seed if sec.base.seed is not None else seed
    folder = base_folder(sec, base_seed, cache_dir)
    if not build_once(folder, complete=lambda f: (f / BASE_RECORD).is_file(), topology=topology,
                      build=lambda tmp: _train_base(sec, data, base_seed, tmp, device, log)):
        log(f"base model: cached BertForMaskedLM {folder}")
    record = json.loads((folder / BASE_RECORD).read_text())
    origin = (f"BertForMaskedLM ({sec.model.layers} layers, hidden {sec.model.hidden_size}) trained here with the "
              f"masked-diffusion objective for {sec.base.steps} steps (seed {base_seed}, final loss "
              f"{record['final_train_loss']:.4f}), cached in {folder}")
    return load_mdlm(folder, task.values, task.positions, "cached base model").to(device), origin


def base_folder(sec: MaskedDiffusionConfig, base_seed: int, cache_dir: str | None) -> Path:
    """The cache folder of the base model these settings train."""
    payload = {"version": RECIPE_VERSION, "task": sec.task.model_dump(mode="json"),
               "model": sec.model.model_dump(mode="json"), "base": sec.base.model_dump(mode="json", exclude={"seed"}),
               "seed": base_seed}
    return cache_root(cache_dir) / "masked_diffusion" / "base" / settings_key(payload)


def _train_base(sec: MaskedDiffusionConfig, data: MdSplits, seed: int, tmp: Path, device: torch.device,
                log: Log) -> None:
    task, bc, mc = data.task, sec.base, sec.model
    model = build_mdlm(task.values, task.positions, hidden_size=mc.hidden_size, layers=mc.layers, heads=mc.heads,
                       intermediate_size=mc.intermediate_size, seed=derive_seed(seed, "mdlm-base"))
    log(f"base model: training a BertForMaskedLM with the masked-diffusion objective for {bc.steps} steps")
    train_cfg = TrainConfig(steps=bc.steps, micro_batch_size=bc.batch_size, lr=bc.lr, weight_decay=0.0,
                            warmup_steps=min(bc.warmup_steps, bc.steps - 1), schedule="cosine", precision="fp32",
                            device=str(device), keep_checkpoints=1, log_every=max(1, bc.steps // 5))
    job = TrainJob(train=train_cfg, seed=seed, run_dir=tmp / "run", run_name="mdlm-base",
                   players=[pretrain_player(model, task.values, bc.min_mask_prob, seed)], examples=data.train,
                   collate=make_collate(task.answer_start), topology=Topology(), device=device,
                   sampler=ExampleSampler, log=log, unit="tok")
    t0 = time.perf_counter()
    result = train_apart(job)
    shutil.rmtree(tmp / "run", ignore_errors=True)
    model.cpu().save_pretrained(tmp, safe_serialization=True)
    record = {"settings": bc.model_dump(mode="json"), "seed": seed, "train_sequences": len(data.train),
              "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    log(f"base model: trained in {record['train_seconds']} s, final loss {result.final_loss:.4f}")
