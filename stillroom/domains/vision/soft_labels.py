"""The image soft-label store (FKD-style): per training image, ``R`` crop views with the teacher's top-k label.

It is a teacher store (:mod:`stillroom.teachers.store_format`, docs/STORE.md) in which each training
image is a "sequence" of ``R = classifier.store.views_per_image`` positions, one per view, so the
language store's machinery is reused as it is: the manifest, shard planning, sha256 per shard, atomic
shard writes, resume shard by shard after a kill, and field-by-field refusal. Per view (row) a shard
holds the teacher's top-k ids, log-probs at ``loss.loss_temperature`` and tail log-mass (quantised as
``logprob_dtype`` says), plus ``view_boxes`` ``[R, 4]`` int16 (top, left, h, w in input pixels) and
``view_flips`` ``[R]`` uint8. View ``v`` of image ``uid`` is :func:`~.views.sample_view` of
``(seed, uid, v)`` with ``classifier.augment``'s settings; the stored box is what training crops.

The manifest adds ``kind: images``, ``views_per_image``, ``image_shape``, the view settings
(``augment``, ``crop_scale``, ``crop_ratio``, ``flip``), ``view_seed`` and ``shard_images`` to the
language store's fields (``teacher`` holds the teacher's weight hash, ``vocab_size`` the number of
classes, ``data_fingerprint`` a sha256 over the training images' uids, pixels and labels in order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stillroom.domains.vision.views import ViewSettings, apply_view, epoch_view_index, sample_views
from stillroom.teachers.signal import TeacherSignal
from stillroom.teachers.store_format import (
    LOGPROB_TENSORS, REBUILD, SequenceSignal, StoreError, StoreHeader, StoreMismatch, decode_logprobs,
    header_differences, parse_identity,
)
from stillroom.teachers.store_reader import StoreReader
from stillroom.teachers.store_sampled import topk_signal
from stillroom.teachers.store_writer import plan_shards

Log = Callable[[str], None]
KIND = "images"
RECORDED = ("k", "logprob_dtype", "views_per_image", "shard_images")
"""``classifier.store`` settings read from the manifest where the recipe leaves them at their defaults."""
RUN_FIELDS = ("kind", "teacher", "vocab_size", "image_shape", "data_fingerprint", "k", "loss_temperature",
              "logprob_dtype", "views_per_image", "augment", "crop_scale", "crop_ratio", "flip")
"""Fields a store-fed run must agree on with the store (the view seed is not one: boxes are stored)."""
_HINTS = {
    "kind": "the store holds a language model's token positions, not images",
    "teacher": "the store was written by another teacher (other weights)",
    "vocab_size": "the store was written for another number of classes",
    "image_shape": "the store was written for images of another shape",
    "data_fingerprint": "the store covers other training images (classifier.dataset or heldout_fraction changed)",
    "k": "classifier.store.k differs from the store's (leave it unset to use the store's)",
    "loss_temperature": "top-k log-probs cannot be re-tempered: loss.loss_temperature must equal the store's",
    "logprob_dtype": "classifier.store.logprob_dtype differs from the store's (leave it unset to use the store's)",
    "views_per_image": "classifier.store.views_per_image differs (leave it unset to use the store's)",
}


@dataclass
class ImageStoreHeader(StoreHeader):
    """A :class:`StoreHeader` with the image store's fields (positions = views, sequences = images)."""

    kind: str = KIND
    views_per_image: int = 1
    image_shape: list[int] = field(default_factory=list)
    augment: bool = False
    crop_scale: list[float] = field(default_factory=list)
    crop_ratio: list[float] = field(default_factory=list)
    flip: bool = False
    view_seed: int = 0
    shard_images: int = 0


def weight_identity(model: torch.nn.Module) -> str:
    """``classifier:<description>#sha256:<hash of every parameter and buffer, by name>`` (the teacher's identity)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d buffers too
    describe = getattr(model, "describe", lambda: type(model).__name__)().replace("#", " ").replace("@", " at ")
    return f"classifier:{describe}#sha256:{h.hexdigest()}"


def images_fingerprint(examples: list) -> str:
    """sha256 over the ordered training images' uids, pixels (fp32 bytes) and labels."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.uid.encode() + b"\x00" + ex.image.float().contiguous().numpy().tobytes())
        h.update(str(int(ex.label)).encode() + b"\n")
    return h.hexdigest()


def store_folder(cfg: Any) -> Path:
    """``classifier.store.path``, or ``<output_dir>/<name>/teacher_store``."""
    path = cfg.classifier.store.path
    return Path(path).expanduser() if path else cfg.run_dir / "teacher_store"


def image_header(cfg: Any, examples: list, teacher: torch.nn.Module, num_classes: int, settings: dict) -> ImageStoreHeader:
    """The header of the store of ``examples`` (the training split in order); ``settings``: k, logprob_dtype,
    views_per_image, shard_images (the recipe's, or recorded ones)."""
    k, views = int(settings["k"]), int(settings["views_per_image"])
    if k > num_classes:
        raise StoreError(f"classifier.store.k={k} exceeds the {num_classes} classes; set it to at most {num_classes}")
    vs = ViewSettings.of(cfg.classifier.augment)
    if views > 1 and not vs.enabled:
        raise StoreError(f"classifier.store.views_per_image={views} needs classifier.augment.enabled: true")
    shape = list(examples[0].image.shape)
    shard_tokens = int(settings["shard_images"]) * views
    return ImageStoreHeader(
        teacher=parse_identity(weight_identity(teacher)), tokenizer_hash="", vocab_size=num_classes, k=k,
        loss_temperature=float(cfg.loss.loss_temperature), logprob_dtype=settings["logprob_dtype"],
        data_fingerprint=images_fingerprint(examples), shard_tokens=shard_tokens, sequences=len(examples),
        tokens=len(examples) * views, num_shards=len(plan_shards([views] * len(examples), shard_tokens)),
        views_per_image=views, image_shape=shape, augment=vs.enabled, crop_scale=list(vs.crop_scale),
        crop_ratio=list(vs.crop_ratio), flip=vs.flip, view_seed=int(cfg.seed), shard_images=int(settings["shard_images"]),
    )


def view_compute(teacher: torch.nn.Module, header: ImageStoreHeader, *, batch_size: int) -> Callable:
    """The ``compute(examples) -> list[SequenceSignal]`` of :func:`~stillroom.teachers.store_writer.write_store`:
    each image's ``R`` views (boxes, flips) and the teacher's top-k on them, ``batch_size`` views per forward."""
    settings = ViewSettings(header.augment, tuple(header.crop_scale), tuple(header.crop_ratio), header.flip)
    views, hw = header.views_per_image, tuple(header.image_shape[-2:])
    device = next(teacher.parameters()).device

    @torch.no_grad()
    def compute(examples: list) -> list[SequenceSignal]:
        uids = [e.uid for e in examples for _ in range(views)]
        view_ids = [v for _ in examples for v in range(views)]
        boxes_n4, flips_n = sample_views(settings, header.view_seed, uids, view_ids, hw)
        images_n = torch.stack([e.image for e in examples for _ in range(views)])
        logits = []
        for lo in range(0, len(uids), batch_size):
            crops = apply_view(images_n[lo : lo + batch_size], boxes_n4[lo : lo + batch_size],
                               flips_n[lo : lo + batch_size], hw)
            logits.append(teacher.eval()(crops.to(device)).float().cpu())
        ids_nk, lp_nk, tail_n = topk_signal(torch.cat(logits), header.k, header.loss_temperature)
        rows = []
        for i, ex in enumerate(examples):
            s = slice(i * views, (i + 1) * views)
            extra = {"view_boxes": boxes_n4[s].to(torch.int16), "view_flips": flips_n[s].to(torch.uint8)}
            rows.append(SequenceSignal(ex.uid, ids_nk[s], lp_nk[s], tail_n[s], extra=extra))
        return rows

    return compute


class ImageSoftLabels:
    """A complete image store, opened for training: its views and the teacher's top-k labels by (uid, view)."""

    def __init__(self, folder: str | Path) -> None:
        self.reader = StoreReader(folder)
        m = self.reader.manifest
        if m.get("kind") != KIND:
            raise StoreMismatch(f"teacher store {self.reader.folder} holds {m.get('kind') or 'token'} positions of "
                                "a language model, not image views; point classifier.store.path at an image store")
        self.manifest = m
        self.views_per_image = int(m["views_per_image"])

    @property
    def folder(self) -> Path:
        return self.reader.folder

    def check_run(self, expected: dict) -> None:
        """Raise :class:`StoreMismatch` naming every field of :data:`RUN_FIELDS` where store and run differ."""
        stored = {**self.manifest, "teacher": self.manifest.get("teacher", {}).get("identity")}
        wanted = {**expected, "teacher": expected["teacher"]["identity"]}
        diffs = header_differences(stored, wanted, [f for f in RUN_FIELDS if f in wanted])
        if diffs:
            views = "the store's views were drawn with other classifier.augment settings"
            lines = [f"  - {d}: {_HINTS.get(d.split(' ')[0], views)}" for d in diffs]
            raise StoreMismatch(f"teacher store {self.folder} does not match this run:\n" + "\n".join(lines)
                                + f"\n{REBUILD[0].upper() + REBUILD[1:]} (it replaces this store), or point "
                                "classifier.store.path at a matching store", fix="overwrite")

    def gather(self, uids: list[str], view_ids: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``{name: [B, ...]}``: shard tensor ``name`` at view ``view_ids[b]`` of image ``uids[b]``, in batch order
        (one indexing per shard the batch touches)."""
        where: dict[int, list[tuple[int, int]]] = {}
        for b, (uid, v) in enumerate(zip(uids, view_ids)):
            shard, row = self.reader.index.get(uid, (None, None))
            if shard is None or not 0 <= v < self.views_per_image:
                raise StoreMismatch(f"view {v} of image {uid!r} is not in the store {self.folder} (it holds views "
                                    f"0..{self.views_per_image - 1} of other images?); {REBUILD}", fix="overwrite")
            first = int(self.reader.shard(shard)["offsets"][row])  # the image's first view row
            where.setdefault(shard, []).append((b, first + int(v)))
        out: dict[str, torch.Tensor] = {}
        order = torch.tensor([b for pairs in where.values() for b, _ in pairs]).argsort()
        for name in names:
            parts = [self.reader.shard(shard)[name][torch.tensor([r for _, r in pairs])] for shard, pairs in where.items()]
            out[name] = torch.cat(parts)[order]
        return out

    def summary(self) -> str:
        m = self.manifest
        return (f"image soft-label store {self.folder}: {m['sequences']} images x {m['views_per_image']} views, "
                f"{m['num_shards']} shard(s), {m['store_bytes'] / 2**20:.2f} MiB; k={m['k']} of {m['vocab_size']} "
                f"classes, {m['logprob_dtype']} log-probs at T={m['loss_temperature']}; teacher "
                f"{m['teacher']['identity'][:60]}...")


@dataclass
class StoredViews:
    """The :class:`~.views.ViewSource` of a store-fed run: each image uses stored view
    :func:`~.views.epoch_view_index` of the epoch, and training crops the stored box."""

    store: ImageSoftLabels
    seed: int

    def views(self, uids: list[str], epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        view_ids = [epoch_view_index(self.seed, uid, epoch, self.store.views_per_image) for uid in uids]
        got = self.store.gather(uids, view_ids, ("view_boxes", "view_flips"))
        return torch.tensor(view_ids, dtype=torch.long), got["view_boxes"].long(), got["view_flips"].bool()


class StoredSoftLabels:
    """Teacher source of ``classifier.teacher_source: store``: the top-k label of each image's view in the batch
    (``batch.view_ids``), as a :class:`TeacherSignal` with ``[B, 1, K]`` ids/log-probs and ``[B, 1]`` tail."""

    def __init__(self, store: ImageSoftLabels) -> None:
        self.store = store
        self.temperature = float(store.manifest["loss_temperature"])

    def signal(self, batch: Any) -> TeacherSignal:
        if batch.view_ids is None:
            raise ValueError("a store-fed classifier batch needs view_ids (collate it with TrainingViews)")
        names = [n for n in LOGPROB_TENSORS if n in self.store.reader.shard(0)]
        got = self.store.gather(batch.uids, batch.view_ids.tolist(), ("topk_ids", *names))
        lp_bk, tail_b = decode_logprobs(got, 0, len(batch.uids))
        ids_bk = got["topk_ids"].long()
        dev = batch.inputs.device
        return TeacherSignal(topk_ids_btk=ids_bk[:, None].to(dev), topk_logprobs_btk=lp_bk[:, None].to(dev),
                             tail_logmass_bt=tail_b[:, None].to(dev), temperature=self.temperature)


def expected_header(cfg: Any, examples: list, teacher: torch.nn.Module, num_classes: int, store_manifest: dict) -> dict:
    """What a run expects of its store (:data:`RUN_FIELDS`); settings of :data:`RECORDED` the recipe leaves at
    their defaults are the store's."""
    from stillroom.teachers.store_format import recorded_settings

    settings, _ = recorded_settings(cfg.classifier.store, store_manifest, RECORDED)
    return image_header(cfg, examples, teacher, num_classes, settings).as_dict()


def open_store_for_run(cfg: Any, examples: list, teacher: torch.nn.Module, num_classes: int,
                       log: Log) -> ImageSoftLabels:
    """The run's store, checked against the run before step 0 (refused with every differing field named)."""
    store = ImageSoftLabels(store_folder(cfg))
    store.check_run(expected_header(cfg, examples, teacher, num_classes, store.manifest))
    log(f"teacher: {store.summary()}")
    return store


@dataclass
class TrainingInputs:
    """How a classifier job's training batches are made: ``collate`` and ``sampler`` for the
    :class:`~stillroom.train.loop.TrainJob`, and the teacher source (``None`` where no term needs one)."""

    collate: Callable
    sampler: Callable
    teacher: Any


def training_inputs(cfg: Any, store: ImageSoftLabels | None, teacher_model: torch.nn.Module, hw: tuple[int, int],
                    sampler: Callable, collate: Callable, needs_teacher: bool) -> TrainingInputs:
    """Whole images and the online teacher (``augment`` off, no store: the collate and sampler unchanged);
    views drawn here with the online teacher; or the store's views and soft labels."""
    from stillroom.domains.vision.forward import ClassifierTeacher
    from stillroom.domains.vision.views import SampledViews, TrainingViews

    if store is not None:
        views = TrainingViews(StoredViews(store, cfg.seed), collate)
        return TrainingInputs(views.collate, views.track(sampler), StoredSoftLabels(store) if needs_teacher else None)
    teacher = ClassifierTeacher(teacher_model) if needs_teacher else None
    settings = ViewSettings.of(cfg.classifier.augment)
    if not settings.enabled:
        return TrainingInputs(collate, sampler, teacher)
    views = TrainingViews(SampledViews(settings, cfg.seed, hw), collate)
    return TrainingInputs(views.collate, views.track(sampler), teacher)


def image_store_plan(cfg: Any, prep: Any, settings: dict) -> tuple[ImageStoreHeader, list, Callable, list[int]]:
    """What ``stillroom cache-teacher`` writes for a classifier run ``prep`` (:mod:`stillroom.run.cache_teacher`):
    ``(header, training images, compute, views per image)``; ``settings``: :data:`RECORDED`'s values."""
    examples, teacher = prep.data.train, prep.teacher_model
    header = image_header(cfg, examples, teacher, prep.data.dataset.num_classes, settings)
    batch = cfg.classifier.store.cache_batch_size or cfg.classifier.eval_batch_size
    return header, examples, view_compute(teacher, header, batch_size=batch), [header.views_per_image] * len(examples)
