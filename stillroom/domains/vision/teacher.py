"""The classifier teacher: loaded from a folder, or trained here once and cached.

Without ``classifier.teacher.path``, the teacher is trained with cross-entropy on the training split
through the same loop as every student (:func:`stillroom.train.loop.train`: one player, a
:class:`~stillroom.losses.LossMix` of ``ce``), then kept in
``<cache_dir>/classifiers/<key>/`` (``model.safetensors``, ``config.json``, ``teacher.json`` with
its settings and held-out accuracy, ``metrics.jsonl`` of its training). ``key`` hashes the
teacher's settings, the data (name, pixels, labels, held-out fraction) and the seed; a later run
with the same key loads the folder instead of training. The folder is trained in
``.tmp-<key>-<pid>/`` and renamed into place when complete, so a killed run never leaves half a
teacher behind (its temporary folder is removed by the next run that trains it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.core import LossConfig, LossTerm, TrainConfig
from stillroom.config.domains import ClassifierTeacherConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageSplits, check_teacher_fits, collate_images
from stillroom.domains.vision.forward import ClassifierForward
from stillroom.domains.vision.lite0_head import is_pretrained_folder, pretrained_teacher
from stillroom.domains.vision.metrics import logits_of
from stillroom.domains.vision.models import Classifier, arch_json, build_classifier, load_classifier, \
    write_classifier_files
from stillroom.losses import LossMix
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
"""Bumped when how a teacher is trained here changes (part of the cache key)."""


def teacher_key(tc: ClassifierTeacherConfig, data: ImageSplits, heldout_fraction: float, seed: int) -> str:
    """16 hex digits of the SHA-256 of the teacher's settings, the data and the seed."""
    payload = {
        "version": RECIPE_VERSION, "arch": arch_json(tc.arch), "steps": tc.steps, "batch_size": tc.batch_size,
        "lr": tc.lr, "weight_decay": tc.weight_decay, "warmup_steps": tc.warmup_steps, "seed": seed,
        "dataset": data.dataset.name, "data": data.dataset.fingerprint(), "heldout_fraction": heldout_fraction,
    }
    if tc.augment is not None and tc.augment.enabled:  # only then: teachers trained on whole images keep their key
        augment = tc.augment.model_dump(mode="json")
        if augment.get("mix", "none") == "none":  # teachers trained on unmixed crops keep their key
            augment = {k: v for k, v in augment.items() if not k.startswith("mix")}
        payload["augment"] = augment
    return settings_key(payload)


def teacher_train_config(tc: ClassifierTeacherConfig, device: torch.device) -> TrainConfig:
    """The loop settings of a teacher trained here: AdamW, warm-up then cosine to 10%, fp32, clip 1.0
    (the rest: :class:`~stillroom.config.core.TrainConfig`'s defaults, whatever the run's ``train`` says)."""
    return TrainConfig(steps=tc.steps, micro_batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                       warmup_steps=tc.warmup_steps, schedule="cosine", precision="fp32", device=str(device),
                       keep_checkpoints=1, log_every=10)


def classifier_teacher(tc: ClassifierTeacherConfig, data: ImageSplits, *, heldout_fraction: float, seed: int,
                       cache_dir: str | None, device: torch.device, topology: Topology,
                       log: Log) -> tuple[Classifier, str]:
    """``(teacher in eval mode on device, where it comes from)`` as ``tc`` says (see the module docstring).
    With several processes, process 0 trains a missing teacher while the others wait. ``tc.kind: clip``: a CLIP's
    zero-shot classifier over the data set's class names (:mod:`stillroom.domains.vl.clip_teacher`). ``tc.pretrained``
    (or ``tc.path`` a folder it fitted): a pretrained backbone with a head fitted here (:mod:`.lite0_head`)."""
    if tc.pretrained is not None or (tc.path is not None and is_pretrained_folder(tc.path)):  # a pretrained backbone
        return pretrained_teacher(tc, data, heldout_fraction=heldout_fraction, cache_dir=cache_dir, device=device,
                                  topology=topology, log=log)
    if tc.kind == "clip":
        from stillroom.domains.vl.clip_teacher import zero_shot_teacher

        return zero_shot_teacher(tc, data.dataset, seed=seed, cache_dir=cache_dir, device=device, topology=topology,
                                 log=log)
    if tc.path is not None:
        folder = Path(tc.path).expanduser()
        model = load_classifier(folder)
        origin = f"loaded from {folder} ({model.describe()})"
    else:
        teacher_seed = tc.seed if tc.seed is not None else seed
        folder = cache_root(cache_dir) / "classifiers" / teacher_key(tc, data, heldout_fraction, teacher_seed)
        if not build_once(folder, complete=_complete, topology=topology,
                          build=lambda tmp: _train_teacher(tc, data, teacher_seed, folder, tmp, device, log)):
            log(f"teacher: cached classifier {folder}")
        model = load_classifier(folder)
        record = json.loads((folder / "teacher.json").read_text())
        origin = (f"{model.describe()} trained here with cross-entropy for {tc.steps} steps (seed {teacher_seed}, "
                  f"held-out accuracy {100 * record['heldout_accuracy']:.1f}%), cached in {folder}")
    check_teacher_fits(folder, model.in_shape, model.num_classes, data.dataset)
    return model.to(device).eval(), origin


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.safetensors", "config.json", "teacher.json"))


def _train_teacher(tc: ClassifierTeacherConfig, data: ImageSplits, seed: int, folder: Path, tmp: Path,
                   device: torch.device, log: Log) -> None:
    """Train the teacher through the loop into ``tmp`` (renamed to ``folder`` by :func:`build_once`)."""
    ds = data.dataset
    model = build_classifier(tc.arch, ds.in_shape, ds.num_classes, seed=derive_seed(seed, "classifier-teacher"),
                             where="classifier.teacher.arch")
    log(f"teacher: training {model.describe()} with cross-entropy for {tc.steps} steps into {folder}")
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    player = Player("teacher", model, DistillObjective(ClassifierForward(model), mix))
    collate, sampler = collate_images, ExampleSampler
    if tc.augment is not None and tc.augment.enabled:  # crop views drawn as a student's are (seeded, resumable)
        from stillroom.domains.vision.views import SampledViews, TrainingViews, ViewSettings

        views = TrainingViews(SampledViews(ViewSettings.of(tc.augment), seed, tuple(ds.in_shape[1:])), collate)
        collate, sampler = views.collate, views.track(sampler)
        log(f"teacher: trained on crop views (scale {list(tc.augment.crop_scale)}, flip {tc.augment.flip})")
    job = TrainJob(train=teacher_train_config(tc, device), seed=seed, run_dir=tmp, run_name=f"teacher-{folder.name}",
                   players=[player], examples=data.train, collate=collate, topology=Topology(), device=device,
                   sampler=sampler, log=log, unit="img")
    t0 = time.perf_counter()
    result = train_apart(job)
    images = torch.stack([e.image for e in data.heldout])
    labels = torch.tensor([e.label for e in data.heldout])
    accuracy = float((logits_of(model, images, batch_size=512, device=device).argmax(-1) == labels).float().mean())
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    write_classifier_files(model, tmp, extra={"classes": ds.classes})
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "dataset": ds.name,
              "train_images": len(data.train), "heldout_images": len(data.heldout), "heldout_accuracy": accuracy,
              "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: trained in {record['train_seconds']} s, held-out accuracy {100 * accuracy:.1f}%")

