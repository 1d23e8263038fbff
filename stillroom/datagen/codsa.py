"""``stillroom codsa-data``: CoDSA's transfer set, synthesised per class where the data is thin, labelled by the teacher.

In order (Tian & Shen 2025, arXiv 2504.07426, at CPU scale):

1. the classifier run's data and teacher, exactly as ``stillroom run`` builds them (the same split, per-class
   caps and cached teacher);
2. a conditional generator fitted on the real training images (:class:`ClassGenerator`: one PCA basis, one
   Gaussian mixture per class in it; seeded, deterministic);
3. ``codsa.volume`` synthetic images split over the classes by ``codsa.policy`` (:mod:`.codsa_alloc`);
4. per class, samples drawn and labelled by the teacher (its log-probabilities are kept: the soft labels of
   the transfer set), those below ``codsa.min_confidence`` redrawn, up to ``codsa.max_rounds`` draws;
5. the set written atomically to ``codsa.out`` (:mod:`stillroom.domains.vision.codsa_set` reads it back).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from stillroom.config.codsa import CodsaConfig, CodsaGenerator
from stillroom.data.seeds import derive_seed
from stillroom.datagen.codsa_alloc import allocate, cross_validated_errors
from stillroom.domains.vision.codsa_set import (
    FORMAT, MANIFEST, SET_FILE, expected_manifest, file_sha256, resolved_seed,
)
from stillroom.domains.vision.data import ImageExample, build_image_splits
from stillroom.domains.vision.ensemble import classifier_teachers
from stillroom.domains.vision.metrics import logits_of
from stillroom.train.distributed import Topology, resolve_device

Log = Callable[[str], None]


@dataclass
class ClassGenerator:
    """A fitted per-class generator: ``pca`` (scikit-learn PCA over flattened images ``[N, C*H*W]``) and, per
    class, a fitted ``GaussianMixture`` in its ``[D]``-dimensional space; ``in_shape`` ``(C, H, W)``."""

    pca: object
    mixtures: list
    in_shape: tuple[int, ...]
    pools: list[torch.Tensor] | None = None
    """``generator.kind: copies``: per class its real images ``[n_c, C, H, W]``, drawn with replacement."""

    def describe(self) -> str:
        if self.pools is not None:
            return "copies of each class's real images (drawn with replacement)"
        return (f"PCA {self.pca.n_components_} + per-class GMM ({[m.n_components for m in self.mixtures]} components, "
                f"{self.mixtures[0].covariance_type})")

    def features(self, images_nchw: torch.Tensor) -> np.ndarray:
        """``[N, D]`` PCA features of ``images_nchw``."""
        return self.pca.transform(images_nchw.reshape(len(images_nchw), -1).numpy().astype(np.float64))

    def sample(self, cls: int, count: int, rng: np.random.Generator) -> torch.Tensor:
        """``[count, C, H, W]`` float32 images of class ``cls``: a component by the mixture's weights, a Gaussian
        draw from it (``rng`` alone decides both), mapped back to pixels and clipped to [0, 1]."""
        if self.pools is not None:
            return self.pools[cls][torch.from_numpy(rng.integers(0, len(self.pools[cls]), size=count))].clone()
        gmm = self.mixtures[cls]
        comp = rng.choice(len(gmm.weights_), size=count, p=gmm.weights_ / gmm.weights_.sum())
        noise = rng.standard_normal((count, gmm.means_.shape[1]))
        if gmm.covariance_type == "full":
            z = gmm.means_[comp] + np.einsum("nij,nj->ni", np.linalg.cholesky(gmm.covariances_)[comp], noise)
        else:
            z = gmm.means_[comp] + np.sqrt(gmm.covariances_[comp]) * noise
        pixels = np.clip(self.pca.inverse_transform(z), 0.0, 1.0)
        return torch.from_numpy(pixels.astype(np.float32)).reshape(count, *self.in_shape)


def fit_generator(images_nchw: torch.Tensor, labels_n: torch.Tensor, num_classes: int, gen: CodsaGenerator,
                  seed: int) -> ClassGenerator:
    """Fit the PCA on every real training image, then one mixture per class on its images' features
    (``min(components_per_class, n_c // images_per_component)`` components, at least 1)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    flat = images_nchw.reshape(len(images_nchw), -1).numpy().astype(np.float64)
    dims = min(gen.pca_components, flat.shape[1], len(flat))
    pca = PCA(n_components=dims, svd_solver="full").fit(flat)
    feats, labels = pca.transform(flat), labels_n.numpy()
    empty = [c for c in range(num_classes) if not (labels == c).any()]
    if empty:
        raise ValueError(f"classes {empty} have no real training image to model: raise their caps in "
                         "classifier.train_images_per_class so every class keeps at least one")
    if gen.kind == "copies":
        return ClassGenerator(pca, [], tuple(images_nchw.shape[1:]), [images_nchw[labels_n == c] for c in
                                                                      range(num_classes)])
    mixtures = []
    for c in range(num_classes):
        own = feats[labels == c]
        k = max(1, min(gen.components_per_class, len(own) // gen.images_per_component))
        mixtures.append(GaussianMixture(n_components=k, covariance_type=gen.covariance, reg_covar=gen.reg_covar,
                                        random_state=derive_seed(seed, f"codsa-gmm-{c}") % 2**32).fit(own))
    return ClassGenerator(pca, mixtures, tuple(images_nchw.shape[1:]))


@dataclass
class TransferSet:
    """The synthetic images, class by class: ``images [M, C, H, W]``, ``condition [M]``, ``labels [M]`` (the hard
    label ``codsa.label`` chose), ``teacher_logprobs [M, K]``; ``drawn``/``allocation`` per class."""

    images: torch.Tensor
    condition: torch.Tensor
    labels: torch.Tensor
    teacher_logprobs: torch.Tensor
    allocation: list[int]
    drawn: list[int]


def synthesise(generator: ClassGenerator, allocation: list[int], teacher: torch.nn.Module, sec: CodsaConfig,
               seed: int, *, batch_size: int, device: torch.device) -> TransferSet:
    """Per class, draw and label until its allocation passes the confidence filter (see the module docstring)."""
    rng = np.random.default_rng(derive_seed(seed, "codsa-sample"))
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    drawn = []
    for c, want in enumerate(allocation):
        kept_images, kept_logp, tries = [], [], 0
        while sum(len(x) for x in kept_images) < want:
            if tries == sec.max_rounds:
                have = sum(len(x) for x in kept_images)
                raise ValueError(f"codsa: class {c} kept {have} of {want} samples after {sec.max_rounds} draws: the "
                                 f"teacher is rarely at least {sec.min_confidence} confident on them; lower "
                                 "codsa.min_confidence or raise codsa.max_rounds")
            need = want - sum(len(x) for x in kept_images)
            images = generator.sample(c, need, rng)
            logp = logits_of(teacher, images, batch_size=batch_size, device=device).log_softmax(-1)
            keep = logp.max(-1).values.exp() >= sec.min_confidence
            kept_images.append(images[keep])
            kept_logp.append(logp[keep])
            tries += 1
        drawn.append(tries)
        parts.append((torch.cat(kept_images) if kept_images else torch.empty(0, *generator.in_shape),
                      torch.cat(kept_logp) if kept_logp else torch.empty(0, 0)))
    images = torch.cat([p[0] for p in parts])
    logp = torch.cat([p[1] for p in parts if len(p[0])])
    condition = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(allocation)])
    labels = logp.argmax(-1) if sec.label == "teacher" else condition
    return TransferSet(images, condition, labels, logp.float(), allocation, drawn)


def build_transfer_set(train: list[ImageExample], num_classes: int, teacher: torch.nn.Module, sec: CodsaConfig,
                       seed: int, *, batch_size: int, device: torch.device) -> tuple[TransferSet, dict]:
    """``(set, facts for the manifest)`` from the real training images ``train`` and the teacher."""
    images = torch.stack([e.image for e in train])
    labels = torch.tensor([e.label for e in train], dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    generator = fit_generator(images, labels, num_classes, sec.generator, seed)
    errors = None
    if sec.policy == "weak_regions":
        errors = cross_validated_errors(generator.features(images), labels.numpy(), num_classes,
                                        folds=sec.weak_folds, seed=seed)
    allocation = allocate(sec.policy, counts, sec.volume, errors=errors, floor=sec.weak_floor)
    transfer = synthesise(generator, allocation, teacher, sec, seed, batch_size=batch_size, device=device)
    agree = float((transfer.teacher_logprobs.argmax(-1) == transfer.condition).float().mean())
    facts = {"real_per_class": counts, "allocation": allocation, "draws_per_class": transfer.drawn,
             "teacher_agrees_with_condition": round(agree, 4), "weak_region_errors": errors,
             "generator": generator.describe()}
    return transfer, facts


def write_transfer_set(folder: Path, transfer: TransferSet, manifest: dict) -> Path:
    """The safetensors file, then the manifest naming its SHA-256, each to a temporary file renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / SET_FILE, folder / f".tmp-{os.getpid()}-{SET_FILE}"
    tensors = {"images": transfer.images.contiguous(), "labels": transfer.labels.contiguous(),
               "condition": transfer.condition.contiguous(), "teacher_logprobs": transfer.teacher_logprobs.contiguous()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    manifest = {"format": FORMAT, **manifest, "images": len(transfer.labels), "sha256": file_sha256(path)}
    tmp_manifest = folder / f".tmp-{os.getpid()}-{MANIFEST}"
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, folder / MANIFEST)
    return folder


def codsa_data(cfg, log: Log = print) -> Path:
    """Build the run's data and teacher, synthesise the transfer set and write it to ``codsa.out``; returns the
    folder. ``cfg``: a :class:`~stillroom.config.schema.RunConfig` with ``domain: classifier``."""
    if cfg.domain != "classifier":
        raise ValueError(f"stillroom codsa-data synthesises images for the classifier domain; the recipe's domain is "
                         f"{cfg.domain!r}: set domain: classifier")
    sec, topology = cfg.classifier, Topology()
    device = resolve_device(cfg.train.device, topology)
    data = build_image_splits(sec.dataset, sec.heldout_fraction, sec, cache_dir=cfg.cache_dir, run_seed=cfg.seed)
    teacher, origin, _ = classifier_teachers(sec, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                             topology=topology, log=log)
    seed = resolved_seed(cfg)
    transfer, facts = build_transfer_set(data.train, data.dataset.num_classes, teacher, cfg.codsa, seed,
                                         batch_size=sec.eval_batch_size, device=device)
    manifest = {**expected_manifest(cfg, data, teacher), "policy": cfg.codsa.policy, "volume": cfg.codsa.volume,
                "teacher": origin, "classes": data.dataset.classes, "image_shape": list(data.dataset.in_shape), **facts}
    folder = write_transfer_set(cfg.codsa.folder(cfg), transfer, manifest)
    log(f"codsa: {len(transfer.labels)} synthetic images (policy {cfg.codsa.policy}; per class {facts['allocation']}; "
        f"teacher agrees with the conditioning class on {100 * facts['teacher_agrees_with_condition']:.1f}%) in "
        f"{folder}")
    return folder
