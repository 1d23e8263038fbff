"""The VLM teacher of a ``vlm`` run: loaded from a LLaVA folder, or built and trained here once and cached.

Without ``vlm.teacher.path`` a tokenizer is trained on the records' text
(:mod:`stillroom.domains.vl.vlm_tokenizer`), a LLaVA model is built from ``vlm.teacher.arch``
(:func:`~stillroom.domains.vl.vlm_model.build_vlm`) and trained with cross-entropy on the run's training
records through the one loop (:func:`stillroom.train.loop.train_apart`), then kept in
``<cache_dir>/vlms/<key>/`` as an ordinary Hugging Face folder (model, tokenizer, ``preprocessor_config.json``,
``teacher.json`` with its settings and held-out answer accuracy). ``key`` hashes the settings, the records
file's bytes, the data settings and the seed; a later run with the same key loads the folder. The folder is
trained under a temporary name and renamed when complete (:func:`stillroom.models.cached.build_once`).
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
from stillroom.domains.vl.vlm_data import VlmEncoder, generated_folder, record_texts
from stillroom.domains.vl.vlm_eval import answer_accuracy
from stillroom.domains.vl.vlm_model import build_vlm, image_ref, image_token_count, is_vlm, write_preprocessor
from stillroom.domains.vl.vlm_tokenizer import train_tokenizer
from stillroom.losses import LossMix
from stillroom.models import load_model
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once
from stillroom.models.load import LoadedModel
from stillroom.models.precision import torch_dtype
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train_apart

Log = Callable[[str], None]
RECIPE_VERSION = 1
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
    payload = {"version": RECIPE_VERSION, "teacher": cfg.vlm.teacher.model_dump(mode="json", exclude={"path"}),
               "data": data_cfg.model_dump(mode="json"), "files": files.hexdigest(), "seed": seed,
               "image_field": cfg.vlm.image_field}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    model = build_vlm(tc.arch, tokenizer, image_size, seed=derive_seed(seed, "vlm-teacher")).to(device)
    write_preprocessor(tmp, image_size)
    data = build_splits(data_cfg, tokenizer, seed, vlm_encoder(model, tmp, cfg.vlm.image_field))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"teacher: training a {n_params / 1e6:.2f}M-parameter LLaVA ({tc.arch.layers}-layer decoder, "
        f"{len(tokenizer)} tokens) with cross-entropy for {tc.steps} steps on {len(data.train)} sequences")
    mix = LossMix(LossConfig(terms=[LossTerm(name="ce")]))
    forward = StudentForward(model, fused=True, hidden_layers=[], vocab=len(tokenizer))
    train_cfg = TrainConfig(steps=tc.steps, micro_batch_size=tc.batch_size, lr=tc.lr, warmup_steps=tc.warmup_steps,
                            weight_decay=0.01, precision="fp32", device=str(device), keep_checkpoints=1, log_every=25)
    job = TrainJob(train=train_cfg, seed=seed, run_dir=tmp, run_name=f"vlm-teacher-{tmp.name}",
                   players=[Player("teacher", model, DistillObjective(forward, mix))], examples=data.train,
                   collate=functools.partial(collate, pad_id=tokenizer.pad_token_id), topology=Topology(),
                   device=device, sampler=ExampleSampler, log=log, unit="tok")
    t0 = time.perf_counter()
    result = train_apart(job, seed=seed)
    accuracy = answer_accuracy(model, tokenizer, data.heldout[:200], max_new_tokens=8) if data.heldout else {}
    shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"settings": tc.model_dump(mode="json"), "seed": seed, "train_sequences": len(data.train),
              "heldout_sequences": len(data.heldout), "heldout_answer_accuracy": accuracy,
              "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - t0, 2)}
    (tmp / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: trained in {record['train_seconds']} s, held-out answer accuracy "
        f"{100 * accuracy.get('answer_accuracy', float('nan')):.1f}%")


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
