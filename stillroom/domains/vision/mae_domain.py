"""The ``mae`` domain: masked-autoencoder pre-training of a small ViTMAE through the one core.

Why a domain and not a method of the classifier domain: what is trained, saved and measured differs.
The student is a ``ViTMAEForPreTraining`` (not a classifier), its objective is its own reconstruction
loss (:class:`~.mae.MaeObjective`), the teacher (when a method needs one) is another MAE, and the report
measures representations (held-out MAE loss, linear-probe accuracy), not logits. The data path is the
classifier domain's (:func:`~.data.build_image_splits`, the same data sets, hash split and batches;
labels are read by the probe only) and training is :func:`stillroom.train.loop.train` with one player.

``method: sft`` (and ``baseline: true``) is plain MAE pre-training; ``dmae`` and ``self_distill_fpt``
swap the student player's objective through :attr:`MethodPlan.players`. The teacher is loaded or
MAE-pre-trained here once and cached (:mod:`.mae_teacher`). ``save_model`` writes the MAE folder and,
beside it (``<folder>_classifier/``), its encoder as a ``ViTForImageClassification`` that
``classifier.student_path`` loads for fine-tuning on few labels (:func:`~.probe.mae_to_classifier`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.domains import ClassifierConfig
from stillroom.config.mae import DmaeConfig, MaeConfig
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageSplits, build_image_splits, collate_images
from stillroom.domains.vision.hf_models import build_vit_mae
from stillroom.domains.vision.mae import (
    MaeForward, MaeObjective, encode_unmasked, heldout_mae_loss, load_mae, num_patches, save_mae, visible_count,
)
from stillroom.domains.vision.mae_teacher import mae_teacher
from stillroom.domains.vision.models import save_classifier
from stillroom.domains.vision.probe import linear_probe, mae_to_classifier
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import Player, TrainJob

Log = Callable[[str], None]
MAE_METHODS = ("sft", "dmae", "self_distill_fpt")
"""Methods of the mae domain (``sft``: the MAE loss alone)."""


def aligned_block(depth: int, relative_depth: float) -> int:
    """0-based block at ``relative_depth`` of a ``depth``-block encoder: ``ceil(relative_depth * depth) - 1``."""
    return max(0, math.ceil(relative_depth * depth - 1e-9) - 1)


def dmae_pairs(s: DmaeConfig, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """``[(student block, teacher block)]`` aligned by ``dmae`` (the heuristic when the layers are not given);
    a block beyond either network is refused naming the key."""
    if s.student_layers is None:
        return [(aligned_block(student_depth, s.relative_depth), aligned_block(teacher_depth, s.relative_depth))]
    for key, layers, depth in (("student_layers", s.student_layers, student_depth),
                               ("teacher_layers", s.teacher_layers, teacher_depth)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"dmae.{key}={layers}: blocks {bad} do not exist (the network has blocks 0..{depth - 1})")
    return list(zip(s.student_layers, s.teacher_layers))


def teacher_cost(cfg: RunConfig, teacher: nn.Module | None) -> dict[str, float]:
    """Per training image: teacher blocks run and tokens each block sees ([CLS] included); empty without one."""
    if teacher is None:
        return {}
    depth, n = teacher.config.num_hidden_layers, num_patches(teacher)
    if cfg.method == "dmae":
        blocks = 1 + max(m for _, m in dmae_pairs(cfg.dmae, 1 << 30, depth))
        tokens = 1 + (n if cfg.dmae.teacher_tokens == "all" else int(n * (1 - cfg.mae.mask_ratio)))
        return {"teacher_blocks_run": blocks, "teacher_tokens": tokens, "teacher_block_tokens": blocks * tokens}
    if cfg.method == "self_distill_fpt" and cfg.self_distill_fpt.regularizer == "regression":
        return {"teacher_blocks_run": depth, "teacher_tokens": n + 1, "teacher_block_tokens": depth * (n + 1)}
    return {}


def needs_teacher(cfg: RunConfig) -> bool:
    """Whether the method reads an MAE teacher (dmae; self_distill_fpt's regression, not its L2-SP ablation)."""
    if cfg.method == "self_distill_fpt":
        return cfg.self_distill_fpt.regularizer == "regression"
    return cfg.method == "dmae"


@dataclass
class MaeRun:
    """A mae run's models and data, loaded and checked before step 0 (a :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: nn.Module | None
    student: nn.Module
    data: ImageSplits
    teacher_origin: str
    student_origin: str

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` with the MAE loss, its objective swapped by ``method``'s plan (dmae, self_distill_fpt)."""
        cfg = self.cfg
        if method.name not in MAE_METHODS:
            raise ValueError(f"method={method.name} does not train masked autoencoders; domain: mae takes method "
                             f"{', '.join(MAE_METHODS)} (sft: the MAE loss alone)")
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=None, teacher_model=self.teacher_model,
            vocab_size=0, topology=self.topology, mix=None, log=log))
        forward = MaeForward(model, seed=cfg.seed, shift=cfg.mae.shift)
        player = Player("student", model, MaeObjective(forward))
        players = plan.players(player) if plan.players is not None else [player]
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players,
            examples=self.data.train, collate=collate_images, topology=self.topology, device=self.device,
            sampler=ExampleSampler, group_size=1, metrics=plan.metrics, resume=resume, log=log, unit="img",
        )
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model: held-out MAE loss (masks fixed per image), linear-probe accuracy, parameters (encoder
        and all), encoder images/s; ``student_after`` also gets the teacher's cost per training image."""
        sec, out = self.cfg.mae, {}
        for name, (model, heldout) in models.items():
            model.to(self.device)
            row = {"mae_loss": heldout_mae_loss(model, heldout, self.cfg.seed, sec.eval_batch_size),
                   "probe_accuracy": linear_probe(model, self.data.train, heldout, c=sec.probe_c,
                                                  max_iter=sec.probe_max_iter,
                                                  images_per_class=sec.probe_images_per_class,
                                                  batch_size=sec.eval_batch_size),
                   "params": sum(p.numel() for p in model.parameters()),
                   "encoder_params": sum(p.numel() for p in model.vit.parameters()),
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "images_per_s": _encoder_speed(model, heldout, sec.eval_batch_size),
                   "examples": len(heldout)}
            if name == "student_after":
                row.update(teacher_cost(self.cfg, self.teacher_model))
            log(f"eval {name}: mae loss {row['mae_loss']:.4f}, linear probe {100 * row['probe_accuracy']:.1f}%")
            out[name] = row
        return out

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """The MAE folder, and its encoder as a ViT classifier in ``<folder>_classifier/`` (see the module docstring)."""
        save_mae(model, folder)
        ds = self.data.dataset
        classifier = mae_to_classifier(model, ds.num_classes, seed=derive_seed(self.cfg.seed, "mae-classifier-head"))
        save_classifier(classifier, folder.parent / f"{folder.name}_classifier", extra={"classes": ds.classes})

    def load_model(self, folder: Path) -> nn.Module:
        return load_mae(folder, "model folder")

    def report_notes(self) -> list[str]:
        sec, cfg = self.cfg.mae, self.cfg
        n = num_patches(self.student)
        notes = [*self.data.notes(), f"student: {self.student_origin}", f"teacher: {self.teacher_origin}",
                 f"masking: {visible_count(self.student)} of {n} patches visible (mask_ratio {sec.mask_ratio}), "
                 f"drawn per (seed, step, image); norm_pix_loss {sec.norm_pix_loss}; shift {sec.shift} px",
                 "mae_loss: held-out mean masked-patch MSE (pixels in [-1, 1]) with masks fixed per image; "
                 "probe_accuracy: logistic regression on frozen mean-pooled patch tokens of the unmasked "
                 f"training images{'' if sec.probe_images_per_class is None else f' ({sec.probe_images_per_class} per class)'}, "
                 "accuracy on the held-out images",
                 "student/ is a ViTMAEForPreTraining folder; student_classifier/ its encoder as a "
                 "ViTForImageClassification for classifier.student_path (fine-tuning on few labels)"]
        cost = teacher_cost(cfg, self.teacher_model)
        if cost:
            notes.append(f"teacher cost per training image: {cost['teacher_blocks_run']} blocks x "
                         f"{cost['teacher_tokens']} tokens")
        return notes


@torch.no_grad()
def _encoder_speed(model: nn.Module, heldout: list, batch_size: int) -> float:
    """Images per second of the unmasked encoder forward (best of 3 timed passes after one warm-up)."""
    images = torch.stack([e.image for e in heldout[:batch_size]]).to(next(model.parameters()).device)
    was = model.training
    model.eval()
    encode_unmasked(model, images)
    best = min(_timed(lambda: encode_unmasked(model, images)) for _ in range(3))
    model.train(was)
    return len(images) / max(best, 1e-9)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_student(sec: MaeConfig, in_shape: tuple[int, int, int], seed: int) -> tuple[nn.Module, str]:
    """``(student, where it comes from)``: ``mae.student_path`` loaded, or ``mae.student`` built from the seed;
    its mask ratio and norm_pix_loss set from the section."""
    if sec.student_path is not None:
        model, origin = load_mae(sec.student_path, "mae.student_path"), f"loaded from {sec.student_path}"
    else:
        a = sec.student
        model = build_vit_mae(in_shape, patch_size=a.patch_size, hidden_size=a.hidden_size, layers=a.layers,
                              heads=a.heads, decoder_hidden_size=a.decoder_hidden_size,
                              decoder_layers=a.decoder_layers, decoder_heads=a.decoder_heads,
                              seed=derive_seed(seed, "mae-student"))
        origin = f"built from mae.student (seed {seed})"
    check_image_shape(model, in_shape, "mae.student_path" if sec.student_path else "mae.student")
    model.config.mask_ratio, model.config.norm_pix_loss = sec.mask_ratio, sec.norm_pix_loss
    n = sum(p.numel() for p in model.parameters())
    return model.train(), f"ViTMAE d {model.config.hidden_size}, {model.config.num_hidden_layers} blocks ({n:,} " \
                          f"params), {origin}"


def check_image_shape(model: nn.Module, in_shape: tuple[int, int, int], where: str) -> None:
    """Refuse an MAE whose image size or channels differ from the data set's (naming ``where``)."""
    c = model.config
    if (c.num_channels, c.image_size, c.image_size) != tuple(in_shape):
        raise ValueError(f"{where}: the MAE takes {c.num_channels}x{c.image_size}x{c.image_size} images, the data set's "
                         f"are {'x'.join(map(str, in_shape))}; use an MAE built for this data set")


class MaeDomain:
    name = "mae"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> MaeRun:
        """Load and split the images, build or load the student, load or MAE-pre-train the teacher (methods that
        need one)."""
        sec = cfg.mae
        if method.name not in MAE_METHODS:
            raise ValueError(f"method={method.name} does not train masked autoencoders; domain: mae takes method "
                             f"{', '.join(MAE_METHODS)} (sft: the MAE loss alone)")
        device = resolve_device(cfg.train.device, topology)
        split_sec = ClassifierConfig(dataset=sec.dataset, heldout_fraction=sec.heldout_fraction)
        data = build_image_splits(sec.dataset, sec.heldout_fraction, split_sec, cache_dir=cfg.cache_dir,
                                  run_seed=cfg.seed)
        log(f"data: {sec.dataset}, {len(data.train)} training / {len(data.heldout)} held-out images (labels: probe only)")
        student, student_origin = build_student(sec, data.dataset.in_shape, cfg.seed)
        log(f"student: {student_origin}")
        teacher, origin = None, "none (plain MAE pre-training)"
        if needs_teacher(cfg):
            teacher, origin = mae_teacher(sec, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                          topology=topology, log=log)
            check_image_shape(teacher, data.dataset.in_shape, "mae.teacher")
            log(f"teacher: {origin}")
        return MaeRun(cfg, topology, device, teacher, student, data, origin, student_origin)
