"""SimCLR-lite: a self-supervised image encoder, trained here once through the one loop and cached.

UNFUSED's teacher (:mod:`stillroom.methods.unfused`) is an encoder trained without labels. Each training
image gives two views (:func:`augment_views`: a random shift, Gaussian noise, a zeroed square patch); the
encoder (a stillroom :class:`~stillroom.domains.vision.models.Classifier` whose ``embedding_dim`` outputs
are the embedding, e.g. the spec's MLP 64-256-128) maps both, and NT-Xent (:func:`nt_xent`) pulls the two
views of an image together against the other ``2B - 2`` views of the micro-batch.

It trains as a player of :func:`stillroom.train.loop.train` with :class:`SimclrObjective` (no second
loop), in ``<cache_dir>/ssl_teachers/.tmp-<key>-<pid>/``, renamed to ``<key>/`` when complete; ``key``
hashes the settings, the data and the seed, so a later run loads the folder (``model.safetensors``,
``config.json``, ``ssl_teacher.json``). The saved folder loads with
:func:`~stillroom.domains.vision.models.load_classifier`, like a classifier teacher.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.core import TrainConfig
from stillroom.config.unfused import SimclrConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageSplits, collate_images
from stillroom.domains.vision.models import arch_json, build_classifier, load_classifier, write_classifier_files
from stillroom.losses import LossResult
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train

Log = Callable[[str], None]
RECIPE_VERSION = 1
"""Bumped when how the encoder is trained changes (part of the cache key)."""
RECORD = "ssl_teacher.json"


def augment_views(images_bchw: torch.Tensor, g: torch.Generator, *, shift: int, noise: float,
                  erase: int) -> torch.Tensor:
    """One random view per image, ``[B, C, H, W]`` -> ``[B, C, H, W]``: translated by up to ``shift`` pixels
    each way (zero-filled; per image), plus ``noise`` x N(0, 1) per pixel, then an ``erase`` x ``erase`` patch
    set to 0 at a random place. ``g`` (a CPU generator) draws everything, so the views are reproducible."""
    b, c, h, w = images_bchw.shape
    out = images_bchw
    if shift:
        padded = F.pad(out, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (b,), generator=g)
        rows = (torch.arange(h)[None] + dy[:, None]).to(out.device)  # [B, H] rows of the padded map
        cols = (torch.arange(w)[None] + dx[:, None]).to(out.device)  # [B, W]
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * shift))
        out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    if noise:
        out = out + noise * torch.randn(out.shape, generator=g).to(out.device)
    if erase and erase <= min(h, w):
        top = torch.randint(0, h - erase + 1, (b,), generator=g).to(out.device)
        left = torch.randint(0, w - erase + 1, (b,), generator=g).to(out.device)
        r, s = torch.arange(h, device=out.device), torch.arange(w, device=out.device)
        in_rows = (r[None] >= top[:, None]) & (r[None] < top[:, None] + erase)  # [B, H]
        in_cols = (s[None] >= left[:, None]) & (s[None] < left[:, None] + erase)  # [B, W]
        out = out.masked_fill(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)
    return out


def nt_xent(z1_bd: torch.Tensor, z2_bd: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of NT-Xent (SimCLR) over the ``2B`` anchors of two views ``[B, D]`` of ``B`` images.

    Anchor ``i``'s loss is ``-log( exp(s_ip / t) / sum_{j != i} exp(s_ij / t) )`` with ``s`` the cosine
    similarity and ``p`` its other view. ``sum`` is half the sum over anchors and ``count`` is ``B`` images,
    so ``sum / count`` is SimCLR's mean over the ``2B`` anchors. The negatives are the micro-batch's own: the
    loss does not split over micro-batches (use ``grad_accum`` 1)."""
    b = z1_bd.shape[0]
    z = F.normalize(torch.cat([z1_bd, z2_bd]).float(), dim=-1)  # [2B, D]
    sim = z @ z.T / temperature  # [2B, 2B]
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=sim.device), float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(sim.device)
    return F.cross_entropy(sim, positive, reduction="sum") / 2.0, b


class SimclrForward(nn.Module):
    """The player's forward: ``{"z1": encoder(view 1) [B, D], "z2": encoder(view 2) [B, D]}``."""

    def __init__(self, encoder: nn.Module, settings: SimclrConfig, seed: int):
        super().__init__()
        self.encoder = encoder
        self.settings = settings
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "simclr-views"))

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        s = self.settings
        views = [augment_views(batch.inputs, self.generator, shift=s.shift, noise=s.noise, erase=s.erase)
                 for _ in range(2)]
        return {"z1": self.encoder(views[0]), "z2": self.encoder(views[1])}


@dataclass
class SimclrObjective:
    """NT-Xent on the two views (labels are never read)."""

    forward: SimclrForward
    temperature: float
    state: nn.Module = field(default_factory=nn.Module)

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: None) -> LossResult:
        total, count = nt_xent(outputs["z1"], outputs["z2"], self.temperature)
        return LossResult(total=total, count=count, parts={"nt_xent": float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def ssl_key(s: SimclrConfig, data: ImageSplits, seed: int) -> str:
    """16 hex digits of the SHA-256 of the settings, the data (pixels, labels, the training uids) and the seed."""
    payload = {"version": RECIPE_VERSION, "settings": s.model_dump(mode="json", exclude={"arch", "seed"}),
               "arch": arch_json(s.arch), "seed": seed, "data": data.dataset.fingerprint(),
               "train": hashlib.sha256("\n".join(e.uid for e in data.train).encode()).hexdigest()}
    return settings_key(payload)


def ssl_teacher(s: SimclrConfig, data: ImageSplits, *, seed: int, cache_dir: str | None, device: torch.device,
                topology: Topology, log: Log) -> tuple[nn.Module, str, Path]:
    """``(encoder in eval mode on device, where it comes from, its folder)``: the cached SimCLR encoder of these
    settings, trained first when missing (process 0 trains, the others wait)."""
    seed = s.seed if s.seed is not None else seed
    folder = cache_root(cache_dir) / "ssl_teachers" / ssl_key(s, data, seed)
    if not build_once(folder, complete=lambda f: (f / RECORD).is_file(), topology=topology,
                      build=lambda tmp: _train(s, data, seed, folder, tmp, device, log)):
        log(f"unfused: cached SimCLR teacher {folder}")
    model = load_classifier(folder)
    record = json.loads((folder / RECORD).read_text())
    origin = (f"SimCLR-lite {model.describe()} trained here without labels for {s.steps} steps (seed {seed}, final "
              f"NT-Xent {record['final_loss']:.3f}), cached in {folder}")
    return model.to(device).eval(), origin, folder


def _train(s: SimclrConfig, data: ImageSplits, seed: int, folder: Path, tmp: Path, device: torch.device,
           log: Log) -> None:
    """Train the encoder through the loop into ``tmp`` (renamed to ``folder`` by :func:`build_once`)."""
    ds = data.dataset
    encoder = build_classifier(s.arch, ds.in_shape, s.embedding_dim, seed=derive_seed(seed, "simclr-encoder"),
                               where="unfused.ssl.arch")
    log(f"unfused: training the SimCLR teacher {encoder.describe()} for {s.steps} steps into {folder}")
    forward = SimclrForward(encoder, s, seed)
    tc = TrainConfig(steps=s.steps, micro_batch_size=s.batch_size, lr=s.lr, warmup_steps=s.warmup_steps,
                     schedule="cosine", precision="fp32", device=str(device), keep_checkpoints=1, log_every=50)
    job = TrainJob(train=tc, seed=seed, run_dir=tmp, run_name=f"ssl-{folder.name}",
                   players=[Player("encoder", encoder, SimclrObjective(forward, s.temperature))],
                   examples=data.train, collate=collate_images, topology=Topology(), device=device,
                   sampler=ExampleSampler, log=log, unit="img")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the run goes on exactly as with a cached teacher
        result = train(job)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    write_classifier_files(encoder, tmp, extra={"embedding": "outputs are SimCLR embeddings, not class logits"})
    record = {"settings": s.model_dump(mode="json"), "seed": seed, "dataset": ds.name, "train_images": len(data.train),
              "final_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
