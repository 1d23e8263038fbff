"""Expert trajectories (spec 5.2): classifiers trained on the real images, their parameters after every epoch.

Expert ``i`` is ``classifier.student``'s architecture initialised from ``derive_seed(seed, "ast-expert", i)``,
trained ``ast.experts.epochs`` epochs with SGD (momentum, weight decay, one lr drop at ``epochs // 2 + 1``) on
shuffled batches of the standardised training images. The loss of a batch is ``d_e * CE + GP``: ``d_e`` the
clipping-loss factor (:func:`~.losses.clip_loss_factor`, 1 when ``clip_loss`` is off), ``GP`` the input-gradient
penalty (:func:`~.losses.input_gradient_penalty`, off at weight 0). AST's smoothing makes the trajectory's
per-epoch "speed" ``||theta_(e+1) - theta_e||`` smaller early on; the manifest records it.

The trajectories are cached in ``<cache_dir>/ast_experts/<key>/``: ``expert_NN/epoch_NNN.safetensors`` (the
parameters by name) and ``manifest.json`` (settings, per-expert speeds and held-out accuracy). ``key`` hashes
the expert settings, the architecture, the data's pixels and labels and the seed. The folder is written under
a temporary name and renamed into place when every expert is done, like the cached classifier teachers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stillroom.config.dataset_distill import AstExperts
from stillroom.config.domains import ClassifierArch
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.ast.losses import clip_loss_factor, flat, input_gradient_penalty
from stillroom.domains.vision.ast.realdata import RealData
from stillroom.domains.vision.models import arch_json, build_classifier
from stillroom.models.builtin import cache_root
from stillroom.models.cached import settings_key

Log = Callable[[str], None]
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Trajectories:
    """``params[i][e]``: expert ``i``'s parameters (name -> tensor) after epoch ``e`` (``e = 0``: at init)."""

    folder: Path
    params: list[list[dict[str, torch.Tensor]]]
    manifest: dict

    def flat(self, i: int, e: int) -> torch.Tensor:
        """Expert ``i`` after epoch ``e`` as one vector ``[P]``."""
        return flat(self.params[i][e])


def expert_key(settings: AstExperts, arch: ClassifierArch, data: RealData, seed: int) -> str:
    payload = {"version": VERSION, "experts": settings.model_dump(mode="json", exclude={"seed"}), "seed": seed,
               "arch": arch_json(arch), "data": data.fingerprint, "mean": data.mean, "std": data.std}
    return settings_key(payload)


def expert_trajectories(settings: AstExperts, arch: ClassifierArch, data: RealData, *, seed: int,
                        cache_dir: str | None, log: Log) -> Trajectories:
    """The cached trajectories of these settings, trained first when missing (see the module docstring)."""
    seed = settings.seed if settings.seed is not None else seed
    folder = cache_root(cache_dir) / "ast_experts" / expert_key(settings, arch, data, seed)
    if (folder / MANIFEST).is_file():
        log(f"experts: cached trajectories {folder}")
    else:
        _train_all(settings, arch, data, seed, folder, log)
    manifest = json.loads((folder / MANIFEST).read_text())
    params = [[load_file(str(folder / f"expert_{i:02d}" / f"epoch_{e:03d}.safetensors"))
               for e in range(settings.epochs + 1)] for i in range(settings.count)]
    return Trajectories(folder, params, manifest)


def _train_all(settings: AstExperts, arch: ClassifierArch, data: RealData, seed: int, folder: Path,
               log: Log) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    experts = []
    for i in range(settings.count):
        snapshots, accuracy = train_expert(settings, arch, data, seed=seed, index=i)
        out = tmp / f"expert_{i:02d}"
        out.mkdir(parents=True)
        for e, params in enumerate(snapshots):
            save_file({k: v.contiguous() for k, v in params.items()}, str(out / f"epoch_{e:03d}.safetensors"))
        experts.append({"speed": trajectory_speed(snapshots), "heldout_accuracy": accuracy})
        log(f"experts: {i + 1}/{settings.count} trained, held-out accuracy {100 * accuracy:.1f}%")
    manifest = {"version": VERSION, "settings": settings.model_dump(mode="json"), "seed": seed,
                "arch": arch_json(arch), "dataset": data.name, "experts": experts,
                "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another run wrote the same trajectories first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"experts: {settings.count} trajectories in {manifest['train_seconds']} s, cached in {folder}")


def train_expert(settings: AstExperts, arch: ClassifierArch, data: RealData, *, seed: int, index: int
                 ) -> tuple[list[dict[str, torch.Tensor]], float]:
    """``(parameters after each epoch 0..epochs, held-out accuracy)`` of expert ``index``."""
    model = build_classifier(arch, data.in_shape, data.num_classes, seed=derive_seed(seed, "ast-expert", index),
                             where="classifier.student")
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(derive_seed(seed, "ast-expert-data", index))
    snapshots = [_snapshot(model)]
    for epoch in range(settings.epochs):
        if epoch == settings.epochs // 2 + 1:
            for group in opt.param_groups:
                group["lr"] *= settings.lr_drop
        factor = clip_loss_factor(epoch, start=settings.clip_start, epochs=settings.clip_epochs) \
            if settings.clip_loss else 1.0
        perm = torch.randperm(len(data.train_y), generator=order)
        for start in range(0, len(perm), settings.batch_size):
            idx = perm[start : start + settings.batch_size]
            loss = expert_batch_loss(model, data.train_x[idx], data.train_y[idx], factor, settings.gradient_penalty)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        snapshots.append(_snapshot(model))
    with torch.no_grad():
        accuracy = float((model(data.test_x).argmax(-1) == data.test_y).float().mean())
    return snapshots, accuracy


def expert_batch_loss(model: torch.nn.Module, images_bchw: torch.Tensor, labels_b: torch.Tensor, factor: float,
                      gp_weight: float) -> torch.Tensor:
    """``factor * mean CE + GP mean`` of one batch (the GP on the same, un-augmented images; 0 at weight 0)."""
    loss = factor * F.cross_entropy(model(images_bchw), labels_b)
    if gp_weight:
        gp_sum, gp_count = input_gradient_penalty(model, images_bchw, gp_weight)
        loss = loss + gp_sum / gp_count
    return loss


def trajectory_speed(snapshots: list[dict[str, torch.Tensor]]) -> list[float]:
    """``||theta_(e+1) - theta_e||_2`` for each epoch ``e`` (length ``len(snapshots) - 1``)."""
    return [float((flat(b) - flat(a)).norm()) for a, b in zip(snapshots, snapshots[1:])]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}
