"""The ``clip`` domain: a small image-text dual encoder trained contrastively through the one core.

Why a domain: what is trained, saved and measured differs from a classifier. The student is an
:class:`~.clip_model.ImageTextModel` (a ``VisionTextDualEncoderModel`` built here, or a ``CLIPModel`` /
dual-encoder folder), its objective is InfoNCE over image-caption pairs (:mod:`.clip_train`), and the report
measures zero-shot accuracy from class-name prompts, image->text recall@1 and calibration per held-out data set
(:mod:`.clip_evaluate`). Data: :mod:`.clip_data`. Before step 0 every caption is tokenized once, so a caption
longer than the text tower's positions is refused naming its record; a class data set whose prompt set lacks a
class, and an image without a caption, are refused while the data loads.

``method: sft`` (and ``baseline: true``) is contrastive training; ``method: ogen`` freezes a trained CLIP
(``ogen.clip``: a folder, or trained here once and cached, :mod:`.clip_teacher`) and trains OGEN's prompt
residual through :attr:`MethodPlan.players` on few base-class shots (:mod:`stillroom.methods.ogen`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.domains.vision.metrics import ECE_BINS, expected_calibration_error, reliability_bins
from stillroom.domains.vl.clip_data import ClipSplits, build_clip_splits, collate_clip
from stillroom.domains.vl.clip_evaluate import clip_metrics
from stillroom.domains.vl.clip_model import load_image_text, save_image_text
from stillroom.domains.vl.clip_teacher import build_clip, cached_clip, check_captions, text_cache
from stillroom.domains.vl.clip_train import ClipForward, ClipObjective, TextFeatureCache
from stillroom.eval.plots import plot_reliability
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import Player, TrainJob

Log = Callable[[str], None]
CLIP_METHODS = ("sft", "ogen")
"""Methods of the clip domain (``sft``: contrastive training)."""


def _refuse_method(name: str) -> None:
    if name not in CLIP_METHODS:
        raise ValueError(f"method={name} does not train image-text models; domain: clip takes method "
                         f"{', '.join(CLIP_METHODS)} (sft: contrastive training)")


@dataclass
class ClipRun:
    """A clip run's model and data, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    student: nn.Module
    data: ClipSplits
    student_origin: str
    teacher_model: nn.Module | None = None
    cache: TextFeatureCache | None = field(default=None, repr=False)

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` contrastively, or as ``method``'s plan replaces the player (ogen)."""
        cfg = self.cfg
        _refuse_method(method.name)
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=model.tokenizer, teacher_model=None,
            vocab_size=0, topology=self.topology, mix=None, log=log))
        player = Player("student", model, ClipObjective(ClipForward(model, self.cache)))
        players = plan.players(player) if plan.players is not None else [player]
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players,
            examples=self.data.train, collate=collate_clip, topology=self.topology, device=self.device,
            sampler=plan.sampler or ExampleSampler, group_size=1, metrics=plan.metrics, resume=resume, log=log,
            unit="img")
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model: zero-shot accuracy and ECE per class set, recall@1 per set, sizes, images/s."""
        sec, out, curves = self.cfg.clip, {}, {}
        for name, (model, _) in models.items():
            curves[name] = {}
            row = clip_metrics(model.to(self.device), self.data.sets, templates=sec.templates,
                               retrieval_images=sec.retrieval_images, batch_size=sec.eval_batch_size,
                               curves=curves[name])
            zs = ", ".join(f"{k[10:]} {100 * v:.1f}%" for k, v in row.items() if k.startswith("zero_shot_"))
            log(f"eval {name}: zero-shot {zs or '-'}; recall@1 mean {100 * row['recall1_mean']:.1f}%")
            out[name] = row
        if "student_after" in curves and curves["student_after"]:
            self._plot_reliability(curves)
        return out

    def _plot_reliability(self, curves: dict[str, dict]) -> None:
        """Zero-shot reliability diagrams of the first class set, one panel per model of the group."""
        first = next(iter(curves["student_after"]))
        named = {n: c[first] for n, c in curves.items() if first in c}
        bins = {n: reliability_bins(*v, n_bins=ECE_BINS) for n, v in named.items()}
        eces = {n: expected_calibration_error(*v, n_bins=ECE_BINS) for n, v in named.items()}
        plot_reliability(self.cfg.run_dir / "reliability.png", bins, eces,
                         f"zero-shot reliability on {first}'s held-out images ({ECE_BINS} confidence bins)")

    def save_model(self, model: nn.Module, folder: Path) -> None:
        save_image_text(model, folder)

    def load_model(self, folder: Path) -> nn.Module:
        return load_image_text(folder, self.device, max_logit_scale=self.cfg.clip.max_logit_scale)

    def report_notes(self) -> list[str]:
        sec = self.cfg.clip
        return [*self.data.notes(), f"student: {self.student_origin}",
                f"zero-shot: class phrases in {len(sec.templates)} templates ({'; '.join(sec.templates)}), text "
                "features averaged; ece_<set>: its calibration (15 bins)",
                f"recall1_<set>: image->text recall@1 of the first {sec.retrieval_images} held-out images against "
                "the set's distinct captions (class sets: a caption of the image's class counts)",
                "loss: InfoNCE both ways with soft targets over equal captions, logit scale learnable (clamped at "
                f"{sec.max_logit_scale:g}); text tower {sec.text_tower}"
                + (", its features cached per caption" if self.cache is not None else ""),
                "student/ is a VisionTextDualEncoderModel (or CLIPModel) folder with its tokenizer"]


class ClipDomain:
    name = "clip"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> ClipRun:
        """Load and caption the data, build or load the model (ogen: its frozen CLIP), check every caption."""
        _refuse_method(method.name)
        sec = cfg.clip
        device = resolve_device(cfg.train.device, topology)
        data = build_clip_splits(sec, cfg.cache_dir, cfg.seed)
        log(f"data: {data.notes()[0][6:]}")
        if method.name == "ogen":
            student, origin = cached_clip(cfg.ogen.clip, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                          topology=topology, log=log)
            student.requires_grad_(False)
        else:
            student, origin = build_clip(sec, cfg.seed)
        student.to(device)
        log(f"student: {origin}")
        check_captions(student, data, sec.eval_batch_size)
        cache = text_cache(student, sec, data) if method.name == "sft" else None
        return ClipRun(cfg, topology, device, student, data, origin, cache=cache)
