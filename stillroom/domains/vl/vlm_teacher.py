"""The VLM teacher of a ``vlm`` run: loaded from a LLaVA folder, or built and trained here once and cached.

Without ``vlm.teacher.path`` a tokenizer is trained on the records' text
(:mod:`stillroom.domains.vl.vlm_tokenizer`), a LLaVA model is built from ``vlm.teacher.arch``
(:func:`~stillroom.domains.vl.vlm_model.build_vlm`) and trained with cross-entropy on the run's training
records through the one loop (:func:`stillroom.train.loop.train_apart`), then kept in
``<cache_dir>/vlms/<key>/`` as an ordinary Hugging Face folder (model, tokenizer, ``preprocessor_config.json``,
``teacher.json`` with its settings and held-out answer accuracy). ``key`` hashes the settings, the records
file's bytes, the data settings and the seed; a later run with the same key loads the folder. The folder is
trained under a temporary name and renamed when complete (:func:`stillroom.models.cached.build_once`).

``vlm.teacher.vision: clip`` starts the vision tower from a CLIP (LLaVA's recipe): ``vlm.teacher.clip.path``, or a
CLIP trained here once and cached (:func:`stillroom.domains.vl.clip_teacher.cached_clip`); its image tower is
copied into the LLaVA (:func:`~stillroom.domains.vl.vlm_model.vlm_from_clip`), kept fixed with
``freeze_vision``, and ``projector_steps`` train the projector alone first (stage 1) before the joint ``steps``
(stage 2), as two consecutive jobs of the loop. The key then includes the CLIP's identity (its weights' hash, or
the cache key of the CLIP trained here).

``vlm.teacher.vision_warmup`` adds a stage between those two: the same cross-entropy on the training records of
the chosen question families alone (``Example.meta["family"]``, e.g. colour_of), its own job of the loop with its
own lr. Why: on the five-family mix the decoder settles on the text prior (it answers "unknown" to every "what
colour is the <shape>?") and never learns to look at the image, whose features are dominated by a constant; on
colour questions alone it must look, and what it learns there carries into the mix (docs/methods/llava_mod.md,
the warm-up sweep). ``teacher.json`` records each stage's steps and sequences (``stages``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.core import DataConfig, DataSource, LossConfig, LossTerm, TrainConfig
from stillroom.config.schema import RunConfig
from stillroom.data import build_splits, collate
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.lm.forward import StudentForward
from stillroom.domains.vl.clip_model import ImageTextModel
from stillroom.domains.vl.vlm_data import VlmEncoder, generated_folder, record_texts
from stillroom.domains.vl.vlm_eval import answer_accuracy
from stillroom.domains.vl.vlm_model import (build_vlm, image_ref, image_token_count, is_vlm, vlm_from_clip,
                                             write_preprocessor)
from stillroom.domains.vl.vlm_tokenizer import train_tokenizer
from stillroom.losses import LossMix
from stillroom.models import load_model
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.models.load import LoadedModel
from stillroom.models.precision import torch_dtype
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 3
"""Bumped when how a VLM teacher is trained here changes (part of the cache key)."""


def vlm_data_config(cfg: RunConfig) -> DataConfig:
    """The run's data settings: with ``vlm.data``, its generated scene questions as the one source."""
    if cfg.vlm is None or cfg.vlm.data is None:
        return cfg.data
    folder = generated_folder(cfg.vlm.data, cache_root(cfg.cache_dir))
    return cfg.data.model_copy(update={"sources": [DataSource(path=str(folder / "records.jsonl"),
                                                             format="prompt_completion")]})


def vlm_encoder(model: torch.nn.Module, folder: str | Path | None, image_field: str) -> VlmEncoder:
    """The record encoder for ``model``: its image token, image-token count and image settings."""
    if not is_vlm(model):
        raise ValueError(f"the `vlm` section needs a LLaVA-style teacher, got {type(model).__name__} (its config "
                         "has no vision_config / image_token_index)")
    ref_of = functools.partial(_ref, model, str(folder) if folder is not None else None)
    return VlmEncoder(int(model.config.image_token_index), image_token_count(model.config), image_field, ref_of)


def _ref(model, folder, path):
    return image_ref(model, path, folder)


def load_vlm_teacher(cfg: RunConfig, data_cfg: DataConfig, topology: Topology, device: torch.device,
                     log: Log) -> tuple[LoadedModel, Path]:
    """``(the teacher with its tokenizer, its folder)`` as ``vlm.teacher`` says (module docstring)."""
    tc = cfg.vlm.teacher
    if tc.path is not None:
        folder = Path(tc.path).expanduser()
    else:
        seed = tc.seed if tc.seed is not None else cfg.seed
        folder = cache_root(cfg.cache_dir) / "vlms" / teacher_key(cfg, data_cfg, seed)
        if not build_once(folder, complete=_complete, topology=topology,
                          build=lambda tmp: _train_teacher(cfg, data_cfg, seed, tmp, device, log)):
            log(f"teacher: cached VLM {folder}")
    from stillroom.config.core import ModelSource

    loaded = load_model(ModelSource(path=str(folder)), dtype=torch_dtype(cfg.teacher.dtype))
    if not is_vlm(loaded.model):
        raise ValueError(f"vlm.teacher.path={folder}: {type(loaded.model).__name__} is not a LLaVA-style model")
    return loaded, folder


def teacher_key(cfg: RunConfig, data_cfg: DataConfig, seed: int) -> str:
    """16 hex digits of the SHA-256 of the teacher's settings, the records' bytes, the data settings and seed."""
    files = hashlib.sha256()
    for src in data_cfg.sources:
        files.update(Path(src.path).expanduser().read_bytes() if src.path else repr(src).encode())
    tc = cfg.vlm.teacher
    unused = {"path"} | ({"clip", "freeze_vision", "projector_steps"} if tc.vision == "scratch" else set())
    payload = {"version": RECIPE_VERSION, "teacher": tc.model_dump(mode="json", exclude=unused),
               "data": data_cfg.model_dump(mode="json"), "files": files.hexdigest(), "seed": seed,
               "image_field": cfg.vlm.image_field, "vision": vision_identity(cfg.vlm.teacher, seed)}
    return settings_key(payload)


def vision_identity(tc, seed: int) -> str | None:
    """What the tower starts from, for the cache key: ``None`` (scratch); a CLIP folder's SHA-256 over its
    ``config.json``, weights and ``preprocessor_config.json``; or ``clips/<key>`` of a CLIP trained here."""
    if tc.vision == "scratch":
        return None
    from stillroom.domains.vl.clip_teacher import clip_key

    spec = _clip_spec(tc)
    if spec.path is None:
        return "clips/" + clip_key(spec, spec.seed if spec.seed is not None else seed)
    digest = hashlib.sha256()
    folder = Path(spec.path).expanduser()
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json", folder / "preprocessor_config.json"]
    for file in files:
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def _clip_spec(tc):
    from stillroom.config.clip import ClipTeacherConfig

    return tc.clip or ClipTeacherConfig()


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.safetensors", "config.json", "teacher.json"))


def _train_teacher(cfg: RunConfig, data_cfg: DataConfig, seed: int, tmp: Path, device: torch.device,
                   log: Log) -> None:
    """Tokenizer, model, cross-entropy training and the files, into ``tmp``."""
    tc = cfg.vlm.teacher
    texts = [t for src in data_cfg.sources if src.path for t in record_texts(Path(src.path).expanduser())]
    if not texts:
        raise ValueError("a VLM teacher trained here needs records files (data.sources[].path) to learn its "
                         "tokenizer from; give data.sources with paths or vlm.teacher.path")
    tokenizer = train_tokenizer(texts, tc.arch.vocab_size)
    image_size = _image_size(cfg, data_cfg)
    model, origin = _build_teacher(cfg, tokenizer, image_size, seed, tmp, device, log)
    data = build_splits(data_cfg, tokenizer, seed, vlm_encoder(model, tmp, cfg.vlm.image_field))
    n_params = sum(p.numel() for p in model.parameters())
    warm = warmup_examples(tc.vision_warmup, data.train)
    log(f"teacher: training a {n_params / 1e6:.2f}M-parameter LLaVA ({tc.arch.layers}-layer decoder, "
        f"{len(tokenizer)} tokens, vision tower {origin}) with cross-entropy for "
        f"{tc.projector_steps} projector + {tc.vision_warmup.steps if warm else 0} warm-up + {tc.steps} steps "
        f"on {len(data.train)} sequences")
    t0 = time.perf_counter()
    stages = {}
    if tc.projector_steps:
        _set_trainable(model, projector_only=True, freeze_vision=True)
        run_stage(cfg, model, tokenizer, data.train, seed, tmp / "projector_stage", tc.projector_steps, tc.lr,
                   device, log)
        shutil.rmtree(tmp / "projector_stage", ignore_errors=True)
        stages["projector"] = {"steps": tc.projector_steps, "sequences": len(data.train)}
    _set_trainable(model, projector_only=False, freeze_vision=tc.vision == "clip" and tc.freeze_vision)
    if warm:
        wc = tc.vision_warmup
        log(f"teacher: vision warm-up on {wc.families} alone: {wc.steps} steps on {len(warm)} sequences")
        run_stage(cfg, model, tokenizer, warm, seed, tmp / "warmup_stage", wc.steps, wc.lr or tc.lr, device, log)
        shutil.rmtree(tmp / "warmup_stage", ignore_errors=True)
        stages["vision_warmup"] = {"steps": wc.steps, "sequences": len(warm), "families": list(wc.families)}
    result = run_stage(cfg, model, tokenizer, data.train, seed, tmp, tc.steps, tc.lr, device, log)
    stages["mixed"] = {"steps": tc.steps, "sequences": len(data.train)}
    model.requires_grad_(True)
    accuracy = answer_accuracy(model, tokenizer, data.heldout[:200], max_new_tokens=8) if data.heldout else {}
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "vision_tower": origin,
              "train_sequences": len(data.train), "heldout_sequences": len(data.heldout),
              "heldout_answer_accuracy": accuracy, "final_train_loss": result.final_loss, "stages": stages,
              "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: trained in {record['train_seconds']} s, held-out answer accuracy "
        f"{100 * accuracy.get('answer_accuracy', float('nan')):.1f}%")


def _build_teacher(cfg: RunConfig, tokenizer, image_size: int, seed: int, tmp: Path, device: torch.device,
                   log: Log) -> tuple[torch.nn.Module, str]:
    """``(the LLaVA on device, where its tower comes from)``, and its ``preprocessor_config.json`` in ``tmp``
    (OpenAI CLIP's mean/std from scratch, the CLIP's own when its tower is copied)."""
    tc = cfg.vlm.teacher
    model_seed = derive_seed(seed, "vlm-teacher")
    if tc.vision == "scratch":
        write_preprocessor(tmp, image_size)
        return build_vlm(tc.arch, tokenizer, image_size, seed=model_seed).to(device), "from scratch"
    spec = _clip_spec(tc)
    if spec.path is None:  # refuse before the CLIP is trained
        check_clip_size(spec.clip.image_size, image_size, cfg.vlm.data is not None)
    clip, origin = vision_clip(cfg, seed, device, log)
    check_clip_size(clip.image_size, image_size, cfg.vlm.data is not None)
    write_preprocessor(tmp, image_size, clip.mean_c.flatten().tolist(), clip.std_c.flatten().tolist())
    return vlm_from_clip(tc.arch, tokenizer, clip, seed=model_seed).to(device), f"copied from the {origin}"


def vision_clip(cfg: RunConfig, seed: int, device: torch.device, log: Log) -> tuple[ImageTextModel, str]:
    """The CLIP whose image tower the teacher starts from (``vlm.teacher.clip``: a folder, or trained here once)."""
    from stillroom.domains.vl.clip_teacher import cached_clip

    clip, origin = cached_clip(_clip_spec(cfg.vlm.teacher), seed=seed, cache_dir=cfg.cache_dir, device=device,
                               topology=Topology(), log=log)
    return clip, f"CLIP {origin}"


def check_clip_size(clip_size: int, image_size: int, generated: bool) -> None:
    """Refuse a CLIP whose tower takes ``clip_size``-pixel images when the records' images have ``image_size``."""
    if clip_size != image_size:
        where = "vlm.data.scenes.image_size" if generated else "the first record's image width"
        raise ValueError(f"vlm.teacher.vision=clip: the CLIP's tower takes {clip_size}-pixel images but "
                         f"{where} is {image_size}: use a CLIP of image size {image_size} (vlm.teacher.clip.path, "
                         "or vlm.teacher.clip.clip.image_size) or images of its size, or vision: scratch")


def _set_trainable(model: torch.nn.Module, *, projector_only: bool, freeze_vision: bool) -> None:
    """Which parts of the LLaVA train: the projector alone (stage 1), or all but a frozen tower (stage 2)."""
    model.requires_grad_(not projector_only)
    model.model.multi_modal_projector.requires_grad_(True)
    if freeze_vision:
        model.model.vision_tower.requires_grad_(False)


def warmup_examples(warmup, examples: list, where: str = "vlm.teacher") -> list:
    """The training examples of the warm-up's families (``Example.meta["family"]``, from the records'
    ``family`` field); ``[]`` without a warm-up. Refuses a warm-up that would select nothing (the error names
    ``<where>.vision_warmup.families``)."""
    if warmup is None:
        return []
    chosen = [e for e in examples if e.meta.get("family") in set(warmup.families)]
    if not chosen:
        found = sorted({str(e.meta.get("family")) for e in examples})
        raise ValueError(f"{where}.vision_warmup.families={warmup.families}: no training record has one of "
                         f"these families (the records' `family` field; found {found}); name families the records "
                         "have, or set vision_warmup: null")
    return chosen


def run_stage(cfg: RunConfig, model, tokenizer, examples: list, seed: int, run_dir: Path, steps: int, lr: float,
               device: torch.device, log: Log, *, batch_size: int | None = None, warmup_steps: int | None = None,
               player: str = "teacher"):
    """One cross-entropy job of the loop on ``examples`` over the trainable parameters (:func:`_set_trainable`);
    batch size and lr warm-up: ``vlm.teacher``'s unless given (the student's warm-up passes its own)."""
    tc = cfg.vlm.teacher
    batch_size = tc.batch_size if batch_size is None else batch_size
    warmup_steps = tc.warmup_steps if warmup_steps is None else warmup_steps
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    forward = StudentForward(model, fused=True, hidden_layers=[], vocab=len(tokenizer))
    train_cfg = TrainConfig(steps=steps, micro_batch_size=batch_size, lr=lr,
                            warmup_steps=min(warmup_steps, steps), weight_decay=0.01, precision="fp32",
                            device=str(device), keep_checkpoints=1, log_every=25)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = TrainJob(train=train_cfg, seed=seed, run_dir=run_dir, run_name=f"vlm-{player}-{run_dir.name}",
                   players=[Player(player, model, DistillObjective(forward, mix))], examples=examples,
                   collate=functools.partial(collate, pad_id=tokenizer.pad_token_id), topology=Topology(),
                   device=device, sampler=ExampleSampler, log=log, unit="tok")
    return train_apart(job, seed=seed)


def _image_size(cfg: RunConfig, data_cfg: DataConfig) -> int:
    """The images' side: the generated scenes' size, else the first record's image's width."""
    if cfg.vlm.data is not None:
        return cfg.vlm.data.scenes.image_size
    from PIL import Image

    from stillroom.domains.vl.vlm_data import image_path

    src = data_cfg.sources[0]
    with open(Path(src.path).expanduser(), encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    with Image.open(image_path(src, first[cfg.vlm.image_field])) as img:
        return int(img.size[0])
