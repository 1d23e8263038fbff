"""The ``generative`` domain: class-conditional denoisers distilled into one- and few-step students on the core.

Why a domain: what is trained (a :class:`~.models.Denoiser`, used as a generator by sampling it in
``student.steps`` evaluations), what a training step does (denoising, or a generator and a fake-score critic
as two players) and what the report measures (sample quality against a known density or the data, and
samples/s) all differ from the classifier and language domains. The loop, players, checkpoints, exact resume,
run folder and report layout are the core's.

``method: sft`` (and the ``baseline: true`` copy) trains the student as a denoiser on the data
(:class:`~.objectives.DenoisingObjective`); ``tsm`` regresses the teacher's predictions instead (MSD's
teacher score matching); the distillation methods (``dmd`` and the others of docs/METHODS.md) swap the
student's player and add theirs through :attr:`~stillroom.methods.base.MethodPlan.players`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.data.seeds import derive_seed
from stillroom.domains.generative.data import GenSplits, build_splits, collate_samples
from stillroom.domains.generative.evaluate import (
    draw, feature_classifier_for, image_row_metrics, keep_samples, kept_samples, nfe, plot_images, plot_points,
    STEER_ROWS, point_metrics, sampler_settings, samples_per_s,
)
from stillroom.domains.generative.models import Denoiser, build_denoiser, load_denoiser, save_denoiser
from stillroom.domains.generative.objectives import DenoiseForward, DenoisingObjective
from stillroom.domains.generative.routed import RoutedDenoiser, check_routes
from stillroom.domains.generative.teacher import check_fits, generative_teacher
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.train.distributed import Topology, resolve_device
from stillroom.train.loop import Player, TrainJob

Log = Callable[[str], None]


def generative_methods() -> tuple[str, ...]:
    """``sft`` and every method registered for the generative domain."""
    from stillroom.methods import METHODS

    return ("sft", *sorted(n for n, m in METHODS.items() if m.domains is not None and "generative" in m.domains))


def check_method(name: str) -> None:
    allowed = generative_methods()
    if name not in allowed:
        raise ValueError(f"method={name} does not train generators; domain: generative takes method "
                         f"{', '.join(allowed)} (sft: the denoising loss on the data)")


@dataclass
class GenerativeRun:
    """A generative run's models and data, loaded and checked before step 0 (a
    :class:`~stillroom.domains.base.PreparedRun`)."""

    cfg: RunConfig
    topology: Topology
    device: torch.device
    teacher_model: Denoiser | None
    student: Denoiser
    data: GenSplits
    teacher_origin: str
    student_origin: str
    feature_classifier: nn.Module | None = None
    """Images: the report's feature classifier (built at the first evaluation)."""

    def job(self, model: nn.Module, method: Method, *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple[TrainJob, MethodPlan]:
        """Train ``model`` as a denoiser of the data, its players swapped or added by ``method``'s plan."""
        cfg = self.cfg
        check_method(method.name)
        plan = method.plan(MethodContext(
            cfg=cfg, run_dir=run_dir, model=model, data=self.data, tokenizer=None, teacher_model=self.teacher_model,
            vocab_size=0, topology=self.topology, mix=None, log=log))
        c = cfg.generative.contrast
        if c.weight > 0 and method.name not in ("sft", "tsm"):
            raise ValueError(f"generative.contrast.weight={c.weight} adds a term to the denoising objective of methods "
                             f"sft and tsm; method={method.name} trains another objective: set the weight to 0")
        contrast = None if baseline else (c.weight, c.temperature)  # the baseline stays the plain regression
        player = Player("student", model, DenoisingObjective(DenoiseForward(model, cfg.generative.teacher.cond_dropout),
                                                             contrast=contrast))
        players = plan.players(player) if plan.players is not None else [player]
        job = TrainJob(
            train=cfg.train, seed=cfg.seed, run_dir=run_dir, run_name=cfg.name, players=players,
            examples=self.data.train, collate=collate_samples, topology=self.topology, device=self.device,
            sampler=ExampleSampler, group_size=1, metrics=plan.metrics, resume=resume, log=log, unit="smp",
        )
        return job, plan

    def evaluate(self, models: dict[str, tuple[nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Per named model (and, with the teacher, its ``teacher_<n>step`` rows): the metrics of
        :mod:`.evaluate`; a group without the teacher gets a speed-only teacher row (timed beside it)."""
        sec, out = self.cfg.generative, {}
        classes = self.data.num_classes
        wanted = dict(models)
        if "teacher" in wanted:
            for n in sec.eval.teacher_steps:
                wanted[f"teacher_{n}step"] = wanted["teacher"]
            if sec.eval.steer_scale > 0 and self.data.toy is not None:
                wanted.update({row: wanted["teacher"] for row in STEER_ROWS})
        reference = kept_samples(self.cfg.run_dir).get("teacher")
        for name, (model, _) in wanted.items():
            model.to(self.device)
            x, labels = draw(model, sec, name, classes, self.data.toy)
            if name == "teacher":
                reference = (x, labels)
            settings = sampler_settings(sec, name, self.data.toy)
            row = {"nfe": nfe(settings), "samples_per_s": samples_per_s(model, settings, classes, self._speed_batch()),
                   "params": sum(p.numel() for p in model.parameters()), "samples": len(labels)}
            if self.data.toy is not None:
                ref = (None, None) if name == "teacher" or reference is None else reference
                row.update(point_metrics(x, labels, self.data, *ref, projections=sec.eval.projections))
                log(f"eval {name}: SWD to data {row['swd_data']:.4f}, mode precision {row['mode_precision']:.3f}, "
                    f"recall {row['mode_recall']:.3f} ({row['nfe']} NFE)")
            else:
                row.update(image_row_metrics(self._classifier(log), x, labels, self.data))
                log(f"eval {name}: Fréchet distance {row['frechet_distance']:.3f}, class accuracy "
                    f"{100 * row['class_accuracy']:.1f}% ({row['nfe']} NFE)")
            if self.topology.is_main:
                keep_samples(self.cfg.run_dir, name, x, labels)
            out[name] = row
        if "teacher" not in models and self.teacher_model is not None:
            out["teacher"] = {"samples_per_s": samples_per_s(self.teacher_model, sampler_settings(sec, "teacher"),
                                                             classes, self._speed_batch())}
        if self.topology.is_main and self.data.toy is not None:
            plot_points(self.cfg.run_dir, kept_samples(self.cfg.run_dir), self.data.heldout_tensors())
        elif self.topology.is_main:
            plot_images(self.cfg.run_dir, kept_samples(self.cfg.run_dir), self.data.class_names)
        return out

    def _speed_batch(self) -> int:
        """Samples per timed batch: 1024 points, 128 images."""
        return 1024 if self.data.toy is not None else 128

    def _classifier(self, log: Log) -> nn.Module:
        if self.feature_classifier is None:
            self.feature_classifier = feature_classifier_for(self.cfg.generative, self.data, seed=self.cfg.seed,
                                                             cache_dir=self.cfg.cache_dir, device=self.device, log=log)
        return self.feature_classifier

    def save_model(self, model: nn.Module, folder: Path) -> None:
        student = self.cfg.generative.student
        save_denoiser(model, folder, extra={"sample_steps": student.steps, "stochastic": student.stochastic,
                                            "sample_fractions": student.fractions})

    def load_model(self, folder: Path) -> nn.Module:
        return load_denoiser(folder, "model folder")

    def report_notes(self) -> list[str]:
        sec = self.cfg.generative
        return [*self.data.notes(), f"teacher: {self.teacher_origin}", f"student: {self.student_origin}",
                f"teacher row: {sec.teacher.sample_steps}-step ODE sampler, guidance {sec.teacher.guidance:g}; "
                f"students sample in {sec.student.steps} step(s)"
                + (" with fresh noise between steps" if sec.student.stochastic else ""),
                "swd_*/mmd_*: sliced Wasserstein distance / RBF-MMD^2 per class, averaged over classes, to the "
                "held-out data or to the teacher row's samples; mode_precision / mode_recall against the exact "
                "mixture; variance: mean per-dimension variance of the samples; samples/s: one batch of 1024"
                if self.data.toy is not None else
                "frechet_distance: Fréchet distance to the held-out images in the penultimate features of a "
                "classifier trained here on the training images; precision / recall: k-NN manifolds (k 3) in the "
                "same features; class_accuracy: samples that classifier assigns to their intended class; "
                "samples/s: one batch of 128"]


def build_student(cfg: RunConfig, teacher: Denoiser | None, data: GenSplits) -> tuple[Denoiser, str]:
    """``(student in train mode, where it comes from)``: ``student.path``, a copy of the teacher, or built."""
    s = cfg.generative.student
    if s.path is not None:
        model = load_denoiser(Path(s.path), "generative.student.path")
        check_fits(model, data, "generative.student.path")
        if s.route is not None:
            check_routes(model, s.route.partition(data.num_classes), f"generative.student.path {s.path}")
        return model.train(), f"{model.describe()} loaded from {s.path}"
    if s.route is not None:
        return _routed_student(cfg, teacher, data)
    if s.init == "teacher" and s.arch.kind == "twinflow":  # TwinFlow: the teacher's weights, the tt input at zero
        from stillroom.domains.generative.twinflow_model import TwinFlowDenoiser

        model = TwinFlowDenoiser.from_teacher(teacher).train().requires_grad_(True)
        return model, f"the teacher's weights in a twinflow network ({model.describe()})"
    if s.init == "teacher":
        model = copy.deepcopy(teacher).train().requires_grad_(True)
        return model, f"a copy of the teacher ({model.describe()})"
    arch = s.arch.as_json(data.sample_shape)
    model = build_denoiser(s.arch.kind, arch, num_classes=data.num_classes, convention=teacher.convention,
                           seed=derive_seed(cfg.seed, "generative-student"))
    return model.train(), f"{model.describe()} built from generative.student.arch (seed {cfg.seed})"


def _routed_student(cfg: RunConfig, teacher: Denoiser | None, data: GenSplits) -> tuple[Denoiser, str]:
    """MSD's routed student: member ``k`` built as a one-model student would be (from ``route.member_paths[k]``,
    a copy of the teacher, or ``student.arch`` with its own seed), then the router over the partition."""
    s = cfg.generative.student
    groups = s.route.partition(data.num_classes)
    members, origins = [], []
    for k in range(len(groups)):
        path = s.route.member_paths[k] if s.route.member_paths is not None else None
        one = s.model_copy(update={"route": None, "path": path})
        member_cfg = cfg.model_copy(update={"seed": derive_seed(cfg.seed, f"generative-student-member-{k}"),
                                            "generative": cfg.generative.model_copy(update={"student": one})})
        member, origin = build_student(member_cfg, teacher, data)
        members.append(member)
        origins.append(origin)
    model = RoutedDenoiser(members, groups).train()
    return model, f"{model.describe()}; members: " + "; ".join(f"{k}: {o}" for k, o in enumerate(origins))


class GenerativeDomain:
    name = "generative"

    def prepare(self, cfg: RunConfig, topology: Topology, method: Method, log: Log) -> GenerativeRun:
        """Draw or load the data, load or train (once) the teacher, build the student."""
        check_method(method.name)
        sec = cfg.generative
        device = resolve_device(cfg.train.device, topology)
        data = build_splits(sec, cache_dir=cfg.cache_dir, run_seed=cfg.seed)
        log(data.notes()[0])
        teacher, origin = generative_teacher(sec, data, seed=cfg.seed, cache_dir=cfg.cache_dir, device=device,
                                             topology=topology, log=log)
        log(f"teacher: {origin}")
        student, student_origin = build_student(cfg, teacher, data)
        log(f"student: {student_origin}")
        return GenerativeRun(cfg, topology, device, teacher, student.to(device), data, origin, student_origin)
