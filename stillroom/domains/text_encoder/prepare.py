"""The ``mlm`` domain: masked-language-model (further) pre-training of a BERT text encoder through the one core.

It mirrors the ``mae`` domain (:mod:`stillroom.domains.vision.mae_domain`) for text: the student is a
``BertForMaskedLM`` (MiniLM-L6's pretrained encoder by default, :mod:`.models`), its objective BERT's MLM loss
(:class:`~.mlm.MlmObjective`), the teacher (``self_distill_fpt``) another BERT further pre-trained on the same
texts (:mod:`.teacher`), and the report measures the representation: held-out MLM loss under fixed masks
and a linear probe on the frozen encoder (:mod:`.probe`), plus parameters and sequences per second.
``method: sft`` (and ``baseline: true``) is plain MLM further pre-training; ``self_distill_fpt`` swaps the
student player's objective through :attr:`MethodPlan.players`. ``save_model`` writes the masked-LM folder
and, beside it (``<folder>_classifier/``), its encoder as a ``BertForSequenceClassification`` (new pooler
and head) that :func:`~.probe.finetune` fine-tunes on few labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.mlm import BUILTIN_MINILM, MlmConfig
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.text_encoder.data import TextSplits, build_text_splits, collate_text
from stillroom.domains.text_encoder.mlm import ENCODER_PREFIX, MaskSpec, MlmForward, MlmObjective, heldout_mlm_loss
from stillroom.domains.text_encoder.models import (
    build_masked_lm, check_compatible, describe, load_masked_lm, load_tokenizer, save_folder, to_sequence_classifier,
)
from stillroom.domains.text_encoder.probe import linear_probe, sequences_per_s
from stillroom.domains.text_encoder.teacher import mlm_teacher
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import Player, TrainJob

Log = Callable[[str], None]
MLM_METHODS = ("sft", "self_distill_fpt")
"""Methods of the mlm domain (``sft``: the MLM loss alone)."""


def _refuse_method(name: str) -> None:
    if name not in MLM_METHODS:
        raise ValueError(f"method={name} does not train masked language models; domain: mlm takes method "
                         f"{', '.join(MLM_METHODS)} (sft: the MLM loss alone)")


def needs_teacher(cfg: RunConfig) -> bool:
    """Whether the method reads a teacher (self_distill_fpt's regression, not its L2-SP ablation)."""
    return cfg.method == "self_distill_fpt" and cfg.self_distill_fpt.regularizer == "regression"


@dataclass
class MlmRun:
    """An mlm run's models, tokenizer and texts, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: nn.Module | None
    student: nn.Module
    tokenizer: object
    data: TextSplits
    teacher_origin: str
    student_origin: str

    @property
    def spec(self) -> MaskSpec:
        return MaskSpec.of(self.tokenizer, self.student.config.vocab_size, self.cfg.mlm.mask_prob)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` with the MLM loss, its objective swapped by ``method``'s plan (self_distill_fpt)."""
        cfg = self.cfg
        _refuse_method(method.name)
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=self.tokenizer,
            teacher_model=self.teacher_model, vocab_size=model.config.vocab_size, topology=self.topology, mix=None,
            log=log))
        player = Player("student", model, MlmObjective(MlmForward(model, self.spec, cfg.seed)))
        players = plan.players(player) if plan.players is not None else [player]
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players,
            examples=self.data.train, collate=functools.partial(collate_text, pad_id=self.pad_id),
            topology=self.topology, device=self.device, sampler=ExampleSampler, group_size=1, metrics=plan.metrics,
            resume=resume, log=log, unit="seq",
        )
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model: held-out MLM loss (masks fixed per text), linear-probe accuracy, parameters (encoder and
        all), encoder sequences/s."""
        sec, out = self.cfg.mlm, {}
        for name, (model, heldout) in models.items():
            model.to(self.device)
            scored = heldout if sec.eval_max_sequences is None else heldout[:sec.eval_max_sequences]
            row = {"mlm_loss": heldout_mlm_loss(model, scored, self.spec, self.cfg.seed, sec.eval_batch_size,
                                                self.pad_id),
                   "probe_accuracy": linear_probe(model, self.data.train, heldout, pooling=sec.probe_pooling,
                                                  per_class=sec.probe_per_class, c=sec.probe_c,
                                                  max_iter=sec.probe_max_iter, batch_size=sec.eval_batch_size,
                                                  pad_id=self.pad_id, seed=self.cfg.seed),
                   "params": sum(p.numel() for p in model.parameters()),
                   "encoder_params": sum(p.numel() for k, p in model.named_parameters() if k.startswith(ENCODER_PREFIX)),
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "sequences_per_s": sequences_per_s(model, heldout, sec.eval_batch_size, self.pad_id),
                   "examples": len(scored)}
            log(f"eval {name}: mlm loss {row['mlm_loss']:.4f}, linear probe {100 * row['probe_accuracy']:.1f}%")
            out[name] = row
        return out

    def save_model(self, model: nn.Module, folder: Path) -> None:
        """The masked-LM folder, and its encoder as a sequence classifier in ``<folder>_classifier/``."""
        save_folder(model, self.tokenizer, folder)
        classifier = to_sequence_classifier(model, self.data.classes, seed=derive_seed(self.cfg.seed, "mlm-classifier"))
        save_folder(classifier, self.tokenizer, folder.parent / f"{folder.name}_classifier")

    def load_model(self, folder: Path) -> nn.Module:
        return load_masked_lm(str(folder), "model folder", seed=0)[0]

    def report_notes(self) -> list[str]:
        sec = self.cfg.mlm
        return [*self.data.notes(), f"student: {self.student_origin}", f"teacher: {self.teacher_origin}",
                f"masking: BERT's, {sec.mask_prob:.0%} of the non-special tokens selected (80% [MASK], 10% random, "
                "10% kept), drawn per (seed, step, text); training loss: per-sequence mean CE over its selected "
                "tokens, averaged over sequences",
                "mlm_loss: held-out mean CE per masked token (nats) with masks fixed per text; probe_accuracy: "
                f"logistic regression on frozen {sec.probe_pooling}-pooled last-layer features of the labelled training "
                f"texts{'' if sec.probe_per_class is None else f' ({sec.probe_per_class} per class)'}, accuracy on the "
                "labelled held-out texts; sequences_per_s: unmasked encoder forward",
                "student/ is a BertForMaskedLM folder (with its tokenizer); student_classifier/ its encoder as a "
                "BertForSequenceClassification (pooler and head new) for few-label fine-tuning "
                "(stillroom.domains.text_encoder.probe.finetune)"]


def build_student(sec: MlmConfig, seed: int) -> tuple[nn.Module, object, str]:
    """``(student, tokenizer, where it comes from)``: ``mlm.student_path`` loaded (MLM head new for an encoder-only
    folder such as MiniLM), or ``mlm.student`` built from the seed."""
    tok_path = sec.tokenizer_path or sec.student_path or BUILTIN_MINILM
    where = "mlm.student_path" if sec.tokenizer_path is None and sec.student_path is not None else "mlm.tokenizer_path"
    tokenizer = load_tokenizer(tok_path, where)
    if sec.student_path is not None:
        model, how = load_masked_lm(sec.student_path, "mlm.student_path", seed=derive_seed(seed, "mlm-student-head"))
    else:
        model = build_masked_lm(sec.student, len(tokenizer), max(sec.seq_len, 64), derive_seed(seed, "mlm-student"))
        how = f"built from mlm.student (seed {seed})"
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer of {tok_path} has {len(tokenizer)} tokens, the student's vocabulary "
                         f"{model.config.vocab_size}: give the student's own tokenizer (mlm.tokenizer_path)")
    if sec.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"mlm.seq_len={sec.seq_len} exceeds the student's {model.config.max_position_embeddings} "
                         "positions; lower it")
    return model, tokenizer, f"{describe(model)}, {how}"


class MlmDomain:
    name = "mlm"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> MlmRun:
        """Build or load the student and its tokenizer, read and split the texts, load or further-pre-train the
        teacher (self_distill_fpt's regression)."""
        sec = cfg.mlm
        _refuse_method(method.name)
        device = resolve_device(cfg.train.device, topology)
        student, tokenizer, student_origin = build_student(sec, cfg.seed)
        log(f"student: {student_origin}")
        data = build_text_splits(sec.dataset, tokenizer, classes=sec.classes, min_words=sec.min_words,
                                 heldout_fraction=sec.heldout_fraction, seq_len=sec.seq_len)
        log(data.notes()[0])
        teacher, origin = None, "none (plain MLM further pre-training)" if method.name == "sft" else "none (L2-SP)"
        if needs_teacher(cfg):
            teacher, origin = mlm_teacher(sec, data, tokenizer, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                          topology=topology, log=log)
            check_compatible(teacher, student, "mlm.teacher.path" if sec.teacher.path else "mlm.teacher.init_path")
            log(f"teacher: {origin}")
        return MlmRun(cfg, topology, device, teacher, student.to(device), tokenizer, data, origin, student_origin)
