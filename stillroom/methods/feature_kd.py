"""``method: feature_kd``: the logit terms of ``loss.terms`` plus feature distillation from a pretrained teacher.

For a classifier student and a teacher with pooled features (the pretrained teacher of
``classifier.teacher.pretrained``, :mod:`stillroom.domains.vision.lite0_head`), the loss per training image is

    L = sum_terms w_i * term_i(student logits, teacher signal) + w * d( n(P(pool(a_s))), n(sg(f_T)) )

``a_s`` the student's activation at ``feature_kd.tap`` (:class:`~stillroom.models.taps`; maps ``[B, C, H, W]``
pooled over space, tokens ``[B, T, D]`` over tokens), ``P`` a projector to the teacher's width
(:func:`~stillroom.models.projectors.build_projector`, seeded, trained with the student and checkpointed in the
objective's state), ``f_T`` the teacher's pooled features ``[B, 1280]`` (no gradient), ``n`` L2 normalisation and
``d`` the mean absolute (l1, DMAE) or squared (l2, FitNets) difference over channels
(:func:`feature_term`, a pure ``(sum over images, images)`` function). Like every term it is a sum over the
micro-batch's images; the loop divides once by the step's image count. The logit terms' teacher signal comes as
``classifier.teacher_source`` says (online or the soft-label store); the features always come from the
in-process teacher, computed once per training image when images are whole (``cache_teacher_features``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.data.seeds import derive_seed
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.models.projectors import build_projector
from stillroom.models.taps import _list_entries, resolve_tap
from stillroom.train.loop import Player


def feature_term(student_bd: torch.Tensor, teacher_bd: torch.Tensor, *, distance: str = "l1",
                 normalize: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum over images of mean over channels of |s - t| (l1) or (s - t)^2 (l2), B)`` for features ``[B, D]``;
    with ``normalize`` each row of both sides is first divided by its L2 norm. ``sum / B`` equals ``nn.L1Loss()``
    (``nn.MSELoss()``) of the (normalised) features."""
    s, t = student_bd.float(), teacher_bd.float()
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    diff = (s - t).abs() if distance == "l1" else (s - t) ** 2
    return diff.mean(-1).sum(), s.shape[0]


def pooled(activation: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: maps ``[B, C, H, W]`` averaged over space, tokens ``[B, T, D]`` over tokens, ``[B, D]`` as is."""
    if activation.ndim == 4:
        return activation.mean((2, 3))
    if activation.ndim == 3:
        return activation.mean(1)
    if activation.ndim == 2:
        return activation
    raise ValueError(f"feature_kd.tap gave an activation of shape {tuple(activation.shape)}; expected [B, D], "
                     "[B, T, D] or [B, C, H, W]")


def default_tap(model: nn.Module) -> str:
    """The student's last feature stage: ``stage.<last>`` (resnet / convnext / mobilevit), ``block.<last>`` (vit),
    the last conv (cnn) or the last hidden Linear (mlp) as ``layer.i``."""
    arch = getattr(model, "arch", None)
    kind = getattr(arch, "kind", None)
    if kind in ("resnet", "convnext"):
        return f"stage.{len(arch.setting('widths')) - 1}"
    if kind == "mobilevit":
        return f"stage.{len(_list_entries(dict(model.named_modules()), 'stage')) - 1}"
    if kind == "vit":
        return f"block.{arch.setting('layers') - 1}"
    if kind == "cnn":
        return f"layer.{len(arch.channels) - 1}"
    if kind == "mlp" and arch.hidden:
        return f"layer.{len(arch.hidden) - 1}"
    raise ValueError(f"feature_kd: no default tap for a {kind or type(model).__name__} student (an mlp needs a "
                     "hidden layer); set feature_kd.tap to a named_modules() name of the student")


class TappedForward(nn.Module):
    """The player's forward: ``{"logits": [B, 1, C], "features": [B, D_s]}`` (the pooled tap) in one pass."""

    def __init__(self, model: nn.Module, tap: str):
        super().__init__()
        self.model = model
        self.tap_name, module = resolve_tap(model, tap)
        self._seen: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(lambda _m, _i, out: self._seen.append(
            out if isinstance(out, torch.Tensor) else out[0]))

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        self._seen = []
        logits = self.model(batch.inputs)
        if not self._seen:
            raise RuntimeError(f"feature_kd.tap {self.tap_name!r} did not run in the student's forward")
        return {"logits": logits[:, None, :], "features": pooled(self._seen[-1])}


class TeacherFeatures:
    """The teacher's pooled features ``[B, D_t]`` of a batch (no grad), kept per image uid when ``cache`` (only
    for whole images: without ``classifier.augment`` every view, a store's included, is the whole image)."""

    def __init__(self, teacher: nn.Module, cache: bool):
        if not hasattr(teacher, "features"):
            raise ValueError(f"method=feature_kd needs a teacher with pooled features (classifier.teacher.pretrained); "
                             f"the teacher is {getattr(teacher, 'describe', lambda: type(teacher).__name__)()}")
        self.teacher, self.cache = teacher, cache
        self.kept: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, batch: Any) -> torch.Tensor:
        device = next(self.teacher.parameters()).device
        if not self.cache:
            return self.teacher.features(batch.inputs.to(device)).float().to(batch.inputs.device)
        todo = [i for i, uid in enumerate(batch.uids) if uid not in self.kept]
        if todo:
            feats = self.teacher.features(batch.inputs[todo].to(device)).float().cpu()
            self.kept.update({batch.uids[i]: f for i, f in zip(todo, feats)})
        return torch.stack([self.kept[uid] for uid in batch.uids]).to(batch.inputs.device)


@dataclass
class FeatureKdObjective:
    """``inner`` (the domain's logit objective) + the weighted feature term; the projector lives in the state."""

    inner: Any
    forward: nn.Module
    teacher: TeacherFeatures
    projector: nn.Module
    settings: Any
    _state: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self._state = nn.ModuleDict({"mix": self.inner.state, "projector": self.projector})

    @property
    def state(self) -> nn.Module:
        return self._state

    def signal(self, batch: Any) -> tuple[Any, torch.Tensor]:
        return self.inner.signal(batch), self.teacher(batch)

    def loss(self, outputs: dict, batch: Any, signal: tuple[Any, torch.Tensor]) -> LossResult:
        logit_signal, teacher_bd = signal
        result = self.inner.loss(outputs, batch, logit_signal)
        s = self.settings
        term, _ = feature_term(self.projector(outputs["features"]), teacher_bd, distance=s.distance,
                               normalize=s.normalize)
        return LossResult(total=result.total + s.weight * term, count=result.count,
                          parts={**result.parts, "feature": float(term.detach())})

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        self.inner.after_step({k: v for k, v in per_target.items() if k != "feature"}, step, total_steps)

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()


def tap_width(model: nn.Module, tap: str, in_shape: tuple[int, ...]) -> int:
    """``D_s``: the pooled tap's width, from one forward of two blank images in eval mode (batch-norm statistics
    untouched; the model's mode restored)."""
    forward = TappedForward(model, tap)
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            blank = type("Blank", (), {"inputs": torch.zeros(2, *in_shape, device=device)})()
            return int(forward(blank)["features"].shape[-1])
    finally:
        forward._handle.remove()
        model.train(was_training)


def _build(ctx: MethodContext) -> MethodPlan:
    cfg = ctx.cfg
    s = cfg.feature_kd  # filled with its defaults when the recipe loads; checked there (FeatureKdConfig.check_run)
    teacher = TeacherFeatures(ctx.teacher_model, s.cache_teacher_features and not cfg.classifier.augment.enabled)
    tap = s.tap or default_tap(ctx.model)
    in_shape = tuple(ctx.data.dataset.in_shape)
    d_s = tap_width(ctx.model, tap, in_shape)
    with torch.no_grad():
        d_t = int(ctx.teacher_model.features(torch.zeros(1, *in_shape, device=next(
            ctx.teacher_model.parameters()).device)).shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "feature-kd-projector"))
        projector = build_projector(s.projector, d_s, d_t)
    ctx.log(f"feature_kd: student tap {tap} ({d_s}) -> {s.projector} projector -> teacher features ({d_t}), "
            f"{s.distance} on {'normalised ' if s.normalize else ''}features, weight {s.weight}")

    def players(student: Player) -> list[Player]:
        forward = TappedForward(student.model, tap)
        objective = FeatureKdObjective(student.objective, forward, teacher, projector, s)
        return [Player(student.name, student.model, objective, replace_batches=student.replace_batches,
                       weight_targets=student.weight_targets)]

    return MethodPlan(players=players)


METHOD = Method("feature_kd", build=_build, domains=("classifier",))
