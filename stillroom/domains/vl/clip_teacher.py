"""A CLIP built here, or loaded, or trained here once and cached (the classifier teacher kind ``clip``, OGEN).

:func:`build_clip` builds the ``clip`` domain's model from its section (or loads ``clip.student_path``).
:func:`cached_clip` returns the CLIP a :class:`~stillroom.config.clip.ClipTeacherConfig` describes: its
``path``, or a CLIP trained contrastively through the one loop (:func:`stillroom.train.loop.train_apart`,
the ``clip`` domain's objective) and kept in ``<cache_dir>/clips/<key>/`` (the model folder, ``clip.json`` with
its settings and held-out zero-shot accuracy, ``metrics.jsonl``). ``key`` hashes the settings and the seed (the
data are generated from them); the folder appears whole or not at all (:func:`~stillroom.models.cached.build_once`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.clip import ClipConfig, ClipTeacherConfig
from stillroom.config.core import TrainConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vl.clip_data import ClipSplits, build_clip_splits, class_phrases, collate_clip
from stillroom.domains.vl.clip_evaluate import clip_metrics
from stillroom.domains.vl.clip_model import ImageTextModel, build_dual_encoder, load_image_text, save_image_text
from stillroom.domains.vl.clip_train import ClipForward, ClipObjective, TextFeatureCache
from stillroom.domains.vl.zero_shot import ZeroShotClassifier
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology
from stillroom.train.loop import Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
"""Bumped when how a CLIP is trained here changes (part of the cache key)."""


def build_clip(sec: ClipConfig, seed: int) -> tuple[ImageTextModel, str]:
    """``(model in train mode, where it comes from)``: ``clip.student_path`` loaded, or built from the section."""
    frozen = sec.text_tower == "frozen"
    if sec.student_path is not None:
        model = load_image_text(sec.student_path, max_logit_scale=sec.max_logit_scale, text_frozen=frozen)
        return model.train(), f"loaded from {sec.student_path}"
    v = sec.vision
    net, tokenizer = build_dual_encoder(image_size=sec.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                                        layers=v.layers, heads=v.heads, projection_dim=sec.projection_dim,
                                        text_path=sec.text_path, logit_scale_init=sec.logit_scale_init,
                                        seed=derive_seed(seed, "clip-vision"))
    model = ImageTextModel(net, tokenizer, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                           max_logit_scale=sec.max_logit_scale, text_frozen=frozen)
    n = sum(p.numel() for p in net.vision_model.parameters())
    text = sec.text_path or "MiniLM-L6 (pretrained)"
    return model.train(), (f"image tower CLIPVision d {v.hidden_size} x {v.layers} blocks, patch {v.patch_size} "
                           f"({n:,} params, seed {seed}); text tower {text} ({sec.text_tower}), mean pooling")


def check_captions(model: ImageTextModel, data: ClipSplits, batch_size: int) -> None:
    """Refuse, before training, a caption longer than the text tower's positions (naming its first record)."""
    first = {}
    for e in data.train + data.heldout:
        first.setdefault(e.caption, e.uid)
    captions = data.captions
    for i in range(0, len(captions), batch_size):
        chunk = captions[i: i + batch_size]
        model.tokenize(chunk, [f"record {first[c]}" for c in chunk])


def text_cache(model: ImageTextModel, sec: ClipConfig, data: ClipSplits) -> TextFeatureCache | None:
    """The per-caption text features of a frozen tower (``clip.cache_text_features``), else ``None``."""
    if sec.text_tower != "frozen" or not sec.cache_text_features:
        return None
    return TextFeatureCache(model, data.captions, sec.eval_batch_size)


def clip_key(tc: ClipTeacherConfig, seed: int) -> str:
    payload = {"version": RECIPE_VERSION, "settings": tc.model_dump(mode="json", exclude={"path", "seed"}),
               "seed": seed}
    return settings_key(payload)


def cached_clip(tc: ClipTeacherConfig, *, seed: int, cache_dir: str | None, device: torch.device,
                topology: Topology, log: Log) -> tuple[ImageTextModel, str]:
    """``(CLIP in eval mode on device, where it comes from)`` (see the module docstring)."""
    if tc.path is not None:
        return load_image_text(tc.path, device), f"loaded from {tc.path}"
    clip_seed = tc.seed if tc.seed is not None else seed
    folder = cache_root(cache_dir) / "clips" / clip_key(tc, clip_seed)
    if not build_once(folder, complete=lambda f: (f / "clip.json").is_file(), topology=topology,
                      build=lambda tmp: _train_clip(tc, clip_seed, cache_dir, folder, tmp, device, log)):
        log(f"clip: cached CLIP {folder}")
    record = json.loads((folder / "clip.json").read_text())
    model = load_image_text(folder / "model", device)
    zs = record["heldout"].get("zero_shot_mean")
    return model, (f"CLIP trained here contrastively for {tc.steps} steps (seed {clip_seed}; held-out zero-shot "
                   f"{'-' if zs is None else f'{100 * zs:.1f}%'}), cached in {folder}")


def _train_clip(tc: ClipTeacherConfig, seed: int, cache_dir: str | None, folder: Path, tmp: Path,
                device: torch.device, log: Log) -> None:
    """Train the CLIP through the loop into ``tmp`` (renamed to ``folder`` by :func:`build_once`)."""
    sec = tc.clip
    data = build_clip_splits(sec, cache_dir, seed)
    model, origin = build_clip(sec, seed)
    model.to(device)
    check_captions(model, data, sec.eval_batch_size)
    log(f"clip: training {origin} for {tc.steps} steps on {len(data.train)} pairs into {folder}")
    player = Player("clip", model, ClipObjective(ClipForward(model, text_cache(model, sec, data))))
    train_cfg = TrainConfig(steps=tc.steps, micro_batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                            warmup_steps=tc.warmup_steps, schedule="cosine", precision="fp32", device=str(device),
                            keep_checkpoints=1, log_every=25)
    job = TrainJob(train=train_cfg, seed=seed, run_dir=tmp, run_name=f"clip-{folder.name}", players=[player],
                   examples=data.train, collate=collate_clip, topology=Topology(), device=device,
                   sampler=ExampleSampler, log=log, unit="img")
    t0 = time.perf_counter()
    result = train_apart(job, seed=seed)
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    heldout = clip_metrics(model, data.sets, templates=sec.templates, retrieval_images=sec.retrieval_images,
                           batch_size=sec.eval_batch_size)
    save_image_text(model, tmp / "model")
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "heldout": heldout,
              "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "clip.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"clip: trained in {record['train_seconds']} s; held-out zero-shot "
        + ", ".join(f"{k[10:]} {100 * v:.1f}%" for k, v in heldout.items() if k.startswith("zero_shot_")))


def zero_shot_teacher(tc, dataset, *, seed: int, cache_dir: str | None, device: torch.device, topology: Topology,
                      log: Log) -> tuple[ZeroShotClassifier, str]:
    """The classifier teacher kind ``clip``: ``(zero-shot classifier over the data set's classes in eval mode, where
    it comes from)``. ``tc`` is a ``ClassifierTeacherConfig`` (its ``path``: a CLIP folder; else its ``clip``: a
    CLIP trained here once and cached); ``dataset`` the classifier data set (an ``ImageSet``)."""
    spec = tc.clip or ClipTeacherConfig()
    if tc.path is not None:
        spec = spec.model_copy(update={"path": tc.path})
    model, origin = cached_clip(spec, seed=seed, cache_dir=cache_dir, device=device, topology=topology, log=log)
    model.requires_grad_(False)
    phrases = class_phrases(dataset.name, dataset.classes, spec.clip.class_prompts)
    classifier = ZeroShotClassifier(model, phrases, spec.clip.templates).to(device).eval()
    return classifier, f"{classifier.describe()} ({', '.join(phrases[:3])}, ...); CLIP {origin}"
