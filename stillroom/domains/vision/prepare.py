"""The classifier domain: an image classifier distilled from a classifier teacher through the one core.

Before step 0, in order: the data set is loaded and split by hash (:mod:`.data`); the teacher is
loaded from a folder or trained here once and cached (:mod:`.teacher`); the student is built from
``classifier.student`` and the seed (:mod:`.models`). A training job binds a model to the method's
logit terms (``kd``: ``loss.terms`` against the in-process teacher; ``sft`` and the baseline:
``ce`` alone) through the same :class:`~stillroom.train.loop.DistillObjective` as a language
model: logits ``[B, 1, C]``, mask ``[B, 1]`` (:mod:`.forward`). The report's metrics are
:mod:`.metrics`'; a confusion matrix of the student after training is drawn into the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stillroom.config.domains import ClassifierConfig
from stillroom.config.schema import LossTerm, RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.data import ImageExample, ImageSplits, build_image_splits, collate_images
from stillroom.domains.vision.codsa_set import with_transfer_set
from stillroom.domains.vision.dual_head import (
    DualHeadClassifier, dual_head_settings, load_dual_head, save_dual_head, wants_dual_head,
)
from stillroom.domains.vision.ensemble import classifier_teachers
from stillroom.domains.vision.forward import ClassifierForward
from stillroom.domains.vision.semi_supervised import semi_supervised_section, split_semi_supervised
from stillroom.domains.vision.soft_labels import ImageSoftLabels, open_store_for_run, training_inputs
from stillroom.domains.vision.metrics import (
    ECE_BINS, classifier_metrics, confusion_matrix, expected_calibration_error, interleaved_images_per_s, logits_of,
    reliability_bins,
)
from stillroom.domains.vision.models import Classifier, build_classifier, load_classifier, save_classifier
from stillroom.domains.vision.subclasses import GroupedOutputs, class_logits, grouped_outputs_note, load_grouped
from stillroom.eval.speed import SPEED_ROUNDS, SPEED_WARMUP, speed_line
from stillroom.eval.plots import plot_confusion_matrix, plot_reliability
from stillroom.losses import LossMix
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import DistillObjective, Player, TrainJob

Log = Callable[[str], None]
CONFUSION_PNG = "confusion_matrix.png"
"""The student's confusion matrix after training, in the run folder (the report embeds it)."""
RELIABILITY_PNG = "reliability.png"
"""Reliability diagrams of the teacher, the student after training and the baseline, in the run folder."""


@dataclass
class ClassifierRun:
    """A classifier run's models and data, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: torch.nn.Module
    """A :class:`Classifier`, or a :class:`~.ensemble.ClassifierEnsemble` of ``classifier.teachers``."""
    student: Classifier
    data: ImageSplits
    teacher_origin: str
    teacher_notes: list[str] = field(default_factory=list)
    """One line per ensemble member (its held-out accuracy and origin); empty with one teacher."""
    student_origin: str = ""
    outputs_per_class: int = 1
    """The student's outputs per class (the method's ``outputs_per_class``; LELP: S), logsumexp'ed into classes."""

    def loss_mix(self, method: Method) -> LossMix:
        """``loss.terms`` (``sft``: ``ce`` alone); refused when a term needs hidden states or attentions."""
        loss_cfg = self.cfg.loss
        if method.ce_only:
            loss_cfg = loss_cfg.model_copy(update={"terms": [LossTerm(name="ce")]})
        mix = LossMix(loss_cfg)
        structural = [s.name for s in mix.specs if s.kind != "logit"]
        if structural:
            raise ValueError(f"loss terms {structural} compare hidden states or attentions; the classifier domain's "
                             "models give logits only: use logit terms (ce, forward_kl, reverse_kl, jsd, ...)")
        return mix

    def job(self, model: torch.nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` with ``method`` on the training images (the baseline's view is the same images)."""
        cfg = self.cfg
        examples, heldout = (self.data.baseline_train, self.data.baseline_heldout) if baseline else \
            (self.data.train, self.data.heldout)
        mix = self.loss_mix(method)
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=None, teacher_model=self.teacher_model,
            vocab_size=self.data.dataset.num_classes, topology=self.topology, mix=mix, log=log))
        inputs = training_inputs(cfg, self.soft_label_store(log), self.teacher_model, self.data.dataset.in_shape[-2:],
                                 plan.sampler or ExampleSampler, collate_images, mix.needs_teacher)
        teacher = inputs.teacher  # online, or the store's soft labels; the views: training batches only
        grouped = self.outputs_per_class > 1 and method.outputs_per_class is None  # e.g. the baseline: classes
        forward = ClassifierForward(GroupedOutputs(model, self.outputs_per_class) if grouped else model)
        player = Player("student", model, DistillObjective(forward, mix, teacher),
                        replace_batches=plan.replace_batches, weight_targets=plan.weight_targets)
        players = plan.players(player) if plan.players is not None else [player]  # e.g. MEAL V2's discriminator
        evaluate = self.periodic_evaluation(heldout) if cfg.train.eval_every and self.topology.is_main else None
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players, examples=examples,
            collate=inputs.collate, topology=self.topology, device=self.device,
            sampler=inputs.sampler, group_size=1, evaluate=evaluate, metrics=plan.metrics,
            resume=resume, log=log, unit="img",
        )
        return job, plan

    def soft_label_store(self, log: Log) -> ImageSoftLabels | None:
        """The run's soft-label store (``classifier.teacher_source: store``), opened and checked against the run
        once, before step 0; ``None`` with an online teacher."""
        if self.cfg.classifier.teacher_source != "store":
            return None
        if getattr(self, "_store", None) is None:
            self._store = open_store_for_run(self.cfg, self.data.train, self.teacher_model,
                                             self.data.dataset.num_classes, log)
        return self._store

    def _tensors(self, examples: list[ImageExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [N, C, H, W], labels [N])`` of ``examples``."""
        if not examples:
            raise ValueError("no held-out images to evaluate: raise classifier.heldout_fraction")
        return torch.stack([e.image for e in examples]), torch.tensor([e.label for e in examples])

    def _logits(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = logits_of(model, images, batch_size=self.cfg.classifier.eval_batch_size, device=device)
        per_class, classes = self.outputs_per_class, self.data.dataset.num_classes
        return class_logits(logits, per_class) if per_class > 1 and logits.shape[-1] == classes * per_class else logits

    def periodic_evaluation(self, heldout: list[ImageExample]) -> Callable[[torch.nn.Module], dict]:
        """Held-out accuracy, CE, KL to the teacher and top-1 agreement, for ``train.eval_every``."""
        images, labels = self._tensors(heldout)
        teacher_logits = self._logits(self.teacher_model, images)

        def evaluate(model: torch.nn.Module) -> dict:
            m = classifier_metrics(self._logits(model, images), labels, teacher_logits)
            return {k: m[k] for k in ("accuracy", "heldout_ce", "kl_teacher_student", "top1_agreement")}

        return evaluate

    def evaluate(self, models: dict[str, tuple[torch.nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model, on its held-out images: accuracy, top-1 agreement with the teacher, ECE, KL(teacher ||
        model), CE, parameters, images/s; ``student_after`` also gets its confusion matrix (JSON and PNG), and
        a group with ``student_after`` draws the reliability diagrams of the teacher (on the student's images),
        the student and the baseline (when in the group) into one PNG.

        Speed is measured for the group at once, after the metrics: every model warmed up, then timed
        interleaved (:func:`~.metrics.interleaved_images_per_s`); a group without the teacher (the students
        after training) times the teacher again beside them and returns a ``teacher`` row holding that speed
        alone, which the caller merges into the teacher's row: the report's speed ratio divides two numbers
        of one measurement."""
        out, batches, curves = {}, {}, {}
        for name, (model, examples) in models.items():
            model.to(self.device)  # the student before training and a loaded one start on the CPU
            images, labels = self._tensors(examples)
            logits = self._logits(model, images)
            teacher_logits = logits if model is self.teacher_model else self._logits(self.teacher_model, images)
            m = classifier_metrics(logits, labels, teacher_logits, self.data.stats.get("minority_classes"))
            m["params"] = sum(p.numel() for p in model.parameters())
            m["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if self.data.shifted:  # out of distribution: the same classes, other colours and backgrounds
                shifted_images, shifted_labels = self._tensors(self.data.shifted)
                shifted = classifier_metrics(self._logits(model, shifted_images), shifted_labels,
                                             self._logits(self.teacher_model, shifted_images))
                m.update({f"shifted_{k}": shifted[k] for k in ("accuracy", "ece", "top1_agreement")})
            batches[name] = (model, images[: self.cfg.classifier.eval_batch_size])
            if name == "student_after":
                ds = self.data.dataset
                matrix = confusion_matrix(logits.argmax(-1), labels, ds.num_classes)
                m["confusion_matrix"] = matrix.tolist()
                self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
                plot_confusion_matrix(self.cfg.run_dir / CONFUSION_PNG, matrix, ds.classes,
                                      f"student (after): {ds.name}, {len(labels)} held-out images")
                curves["teacher"] = (teacher_logits, labels)
            if name in ("student_after", "baseline"):
                curves[name] = (logits, labels)
            log(f"eval {name}: accuracy {100 * m['accuracy']:.1f}%, agreement {100 * m['top1_agreement']:.1f}%, "
                f"ece {m['ece']:.4f}, kl {m['kl_teacher_student']:.4f}, ce {m['heldout_ce']:.4f}")
            out[name] = m
        if "student_after" in curves:
            self._plot_reliability(curves)
        if not timed:  # the group before training: the run times it after training, beside the students
            return out
        again = "teacher" not in batches
        if again:
            batches = {"teacher": (self.teacher_model, next(iter(batches.values()))[1]), **batches}
            out = {"teacher": {}, **out}
        rates = interleaved_images_per_s(batches, device=self.device, precision=self.cfg.train.precision)
        for name, rate in rates.items():
            out[name]["images_per_s"] = rate
        log(speed_line(rates, "images", again))
        return out

    def _plot_reliability(self, curves: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``curves``: name -> (logits ``[N, C]``, labels ``[N]``); one panel each, teacher first."""
        order = [n for n in ("teacher", "student_after", "baseline") if n in curves]
        bins = {n: reliability_bins(*curves[n], n_bins=ECE_BINS) for n in order}
        eces = {n: expected_calibration_error(*curves[n], n_bins=ECE_BINS) for n in order}
        plot_reliability(self.cfg.run_dir / RELIABILITY_PNG, bins, eces,
                         f"reliability on {self.data.dataset.name}'s held-out images ({ECE_BINS} confidence bins)")

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """``model.safetensors`` + ``config.json`` (with the class names), renamed into place (a dual-head student:
        its backbone of ``2C`` outputs and its mixture, :mod:`.dual_head`)."""
        if isinstance(model, DualHeadClassifier):
            return save_dual_head(model, folder, self.data.dataset.classes)
        per_class = self.outputs_per_class
        grouped = per_class > 1 and model.num_classes == per_class * len(self.data.dataset.classes)
        save_classifier(model, folder, extra={"classes": self.data.dataset.classes,
                                              **({"outputs_per_class": self.outputs_per_class} if grouped else {})})

    def load_model(self, folder: Path) -> torch.nn.Module:
        return load_dual_head(folder) if dual_head_settings(folder) is not None else load_grouped(folder)

    def report_notes(self) -> list[str]:
        sec = self.cfg.classifier
        return [
            *self.data.notes(),
            f"teacher: {self.teacher_origin}",
            *self.teacher_notes,
            f"student: {self.student.describe()}, {self.student_origin or f'randomly initialised from seed {self.cfg.seed}'}",
            *grouped_outputs_note(self.outputs_per_class),
            f"metrics on every held-out image: CE and KL(teacher‖model) in nats per image; ECE: top-1 confidence, "
            f"{ECE_BINS} equal-width bins (torchmetrics); images/s: forward passes of {sec.eval_batch_size} images, "
            f"every model warmed up ({SPEED_WARMUP} passes), then the models timed in turn, best of {SPEED_ROUNDS} "
            "rounds; the teacher is timed again beside the students after training",
        ]


class ClassifierDomain:
    name = "classifier"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> ClassifierRun:
        """Load and split the data, load or train the teacher, build the student (see the module docstring)."""
        sec = cfg.classifier
        device = resolve_device(cfg.train.device, topology)
        data = build_image_splits(sec.dataset, sec.heldout_fraction, sec, cache_dir=cfg.cache_dir, run_seed=cfg.seed)
        log(f"data: {sec.dataset}, {len(data.train)} training / {len(data.heldout)} held-out images")
        teacher, origin, notes = classifier_teachers(sec, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                                     topology=topology, log=log)
        log(f"teacher: {origin}")
        if semi_supervised_section(cfg) is not None:  # after the teacher: a teacher trained here saw every label
            data = split_semi_supervised(data, semi_supervised_section(cfg), cfg.seed)
            log(data.notes()[-1])
        if cfg.codsa.add_to_training:  # after the teacher: it labelled the synthetic images, it never trains on them
            data = with_transfer_set(data, cfg, teacher, log)
        per_class = method.outputs_per_class(cfg) if method.outputs_per_class is not None else 1
        dual = wants_dual_head(cfg)  # DHO: a CE head and a KD head, the last layer 2 x classes wide
        student, student_origin = _student(sec, data, cfg.seed, 2 if dual else per_class)
        student = DualHeadClassifier(student, cfg.dho.alpha, cfg.dho.beta) if dual else student
        log(f"student: {student.describe()}{', ' + student_origin if student_origin else ''}")
        return ClassifierRun(cfg, topology, device, teacher, student, data, origin, notes, student_origin, per_class)


def _student(sec: ClassifierConfig, data: ImageSplits, seed: int, per_class: int = 1) -> tuple[Classifier, str]:
    """``(student, where it comes from)``: loaded from ``classifier.student_path`` (checked against the data), or
    built from ``classifier.student`` with weights from the run's seed (origin ``""``)."""
    ds = data.dataset
    if sec.student_path is None:
        return build_classifier(sec.student, ds.in_shape, ds.num_classes * per_class,
                                seed=derive_seed(seed, "classifier-student")), ""
    folder = Path(sec.student_path).expanduser()
    student = load_classifier(folder).train()
    if tuple(student.in_shape) != tuple(ds.in_shape) or student.num_classes != ds.num_classes * per_class:
        raise ValueError(f"classifier.student_path={folder}: that classifier takes images {student.in_shape} into "
                         f"{student.num_classes} classes, but {ds.name!r} has images {ds.in_shape} and "
                         f"{ds.num_classes} classes x {per_class} outputs per class; point it at a student trained "
                         f"on {ds.name!r} by the same method")
    return student, f"loaded from {folder} (classifier.student_path)"
