"""Measuring a text encoder: a linear probe on frozen features, encoder speed, and few-label fine-tuning.

:func:`linear_probe` fits scikit-learn's ``LogisticRegression`` (L2, lbfgs) on standardised frozen features
of the labelled training texts (:func:`encoder_features`: the mean over the attended tokens, or the [CLS],
of the encoder's last layer on the unmasked text) and returns the held-out accuracy, as the image domain's
probe does (:mod:`stillroom.domains.vision.probe`).

:func:`finetune` is the spec's stage 3 (section 8.4): a saved ``BertForSequenceClassification`` folder
(``student_classifier/`` of a ``domain: mlm`` run; its pooler and head new) fine-tuned, encoder and head,
on ``per_class`` labelled training texts per class (chosen per seed) with cross-entropy through the one
loop (one player, AdamW, warm-up then cosine), then scored on the labelled held-out texts.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stillroom.data.seeds import derive_seed
from stillroom.domains.text_encoder.data import TextExample, collate_text
from stillroom.losses import LossResult


@torch.no_grad()
def encoder_features(model: nn.Module, examples: list[TextExample], pooling: str = "mean", batch_size: int = 64,
                     pad_id: int = 0) -> torch.Tensor:
    """``[N, d]`` float32 CPU features of ``examples`` from ``model``'s encoder (``.bert``), in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_text(examples[i:i + batch_size], pad_id).to(device)
        hidden_btd = model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        if pooling == "cls":
            out.append(hidden_btd[:, 0].float().cpu())
        else:
            m = batch.attention_mask.unsqueeze(-1).float()
            out.append(((hidden_btd * m).sum(1) / m.sum(1)).float().cpu())
    model.train(was)
    return torch.cat(out)


def few_per_class(examples: list[TextExample], per_class: int | None, seed: int) -> list[TextExample]:
    """The labelled examples, ``per_class`` of each class (all when ``None``), picked by a hash of ``(seed, uid)``."""
    labelled = sorted((e for e in examples if e.label >= 0), key=lambda e: derive_seed(seed, "few-labels", e.uid))
    if per_class is None:
        return labelled
    taken: dict[int, int] = {}
    out = []
    for e in labelled:
        if taken.get(e.label, 0) < per_class:
            taken[e.label] = taken.get(e.label, 0) + 1
            out.append(e)
    return out


def linear_probe(model: nn.Module, train: list[TextExample], heldout: list[TextExample], *, pooling: str = "mean",
                 per_class: int | None = None, c: float = 1.0, max_iter: int = 1000, batch_size: int = 64,
                 pad_id: int = 0, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on frozen :func:`encoder_features` (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression

    fit, held = few_per_class(train, per_class, seed), [e for e in heldout if e.label >= 0]
    if len({e.label for e in fit}) < 2 or not held:
        raise ValueError("the linear probe needs labelled texts of at least 2 classes in the training split and some "
                         "in the held-out split; give labels (mlm.dataset) or more texts")
    x_fit = encoder_features(model, fit, pooling, batch_size, pad_id).numpy()
    x_held = encoder_features(model, held, pooling, batch_size, pad_id).numpy()
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit((x_fit - mean) / std, np.array([e.label for e in fit]))
    return float((probe.predict((x_held - mean) / std) == np.array([e.label for e in held])).mean())


@torch.no_grad()
def sequences_per_s(model: nn.Module, examples: list[TextExample], batch_size: int, pad_id: int = 0) -> float:
    """Sequences per second of the unmasked encoder forward (best of 3 timed passes after one warm-up)."""
    import time

    was = model.training
    model.eval()
    batch = collate_text(examples[:batch_size], pad_id).to(next(model.parameters()).device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        model.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        times.append(time.perf_counter() - t0)
    model.train(was)
    return len(batch.uids) / max(min(times[1:]), 1e-9)


class _Classify(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return {"logits": self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits}


@dataclass
class ClassifyObjective:
    """Cross-entropy of the class logits ``[B, K]``: ``(sum over texts, B)``."""

    forward: nn.Module
    state: nn.Module = field(default_factory=nn.ModuleDict)

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: Any) -> LossResult:
        total = F.cross_entropy(outputs["logits"].float(), batch.labels, reduction="sum")
        return LossResult(total=total, count=len(batch.uids), parts={"ce": float(total.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


@torch.no_grad()
def accuracy(model: nn.Module, examples: list[TextExample], batch_size: int = 64, pad_id: int = 0) -> float:
    """Fraction of the labelled ``examples`` whose arg-max class is right (eval mode)."""
    was = model.training
    model.eval()
    held = [e for e in examples if e.label >= 0]
    right = 0
    for i in range(0, len(held), batch_size):
        batch = collate_text(held[i:i + batch_size], pad_id).to(next(model.parameters()).device)
        right += int((model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(-1)
                      == batch.labels).sum())
    model.train(was)
    return right / max(len(held), 1)


def finetune(folder: Path, train: list[TextExample], heldout: list[TextExample], *, per_class: int, steps: int,
             seed: int, work: Path, lr: float = 5e-5, batch_size: int = 16, weight_decay: float = 0.01,
             warmup_steps: int = 10, device: str = "cpu", pad_id: int = 0,
             log: Callable[[str], None] = lambda _m: None) -> dict[str, float]:
    """Fine-tune the classifier in ``folder`` on ``per_class`` labelled training texts per class (see the module
    docstring); returns ``{"accuracy", "train_texts", "heldout_texts", "final_loss"}``. ``work``: the loop's run
    folder (its checkpoints are removed afterwards)."""
    from transformers import AutoModelForSequenceClassification

    from stillroom.config.core import TrainConfig
    from stillroom.data.batch import ExampleSampler
    from stillroom.domains.vision.hf_models import _quiet
    from stillroom.train.distributed import Topology
    from stillroom.train.loop import Player, TrainJob, train_apart

    with _quiet():
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).to(device).train()
    fit = few_per_class(train, per_class, seed)
    tc = TrainConfig(steps=steps, micro_batch_size=min(batch_size, len(fit)), lr=lr, weight_decay=weight_decay,
                     warmup_steps=warmup_steps, schedule="cosine", min_lr_ratio=0.0, precision="fp32", device=device,
                     keep_checkpoints=1, log_every=max(1, steps // 4))
    job = TrainJob(train=tc, seed=seed, run_dir=Path(work), run_name=f"finetune-{Path(folder).name}",
                   players=[Player("classifier", model, ClassifyObjective(_Classify(model)))], examples=fit,
                   collate=functools.partial(collate_text, pad_id=pad_id), topology=Topology(),
                   device=torch.device(device), sampler=ExampleSampler, log=log, unit="text")
    result = train_apart(job, seed=derive_seed(seed, "finetune"))
    shutil.rmtree(Path(work) / "checkpoints", ignore_errors=True)
    return {"accuracy": accuracy(model, heldout, pad_id=pad_id), "train_texts": len(fit),
            "heldout_texts": sum(e.label >= 0 for e in heldout), "final_loss": result.final_loss}
