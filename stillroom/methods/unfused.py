"""UNFUSED (Seth et al. 2023): multi-exit self-distillation of a fresh classifier on cluster pseudo-labels.

Before step 0 (:func:`_build`): the self-supervised teacher is loaded from ``unfused.teacher_path`` or
trained here and cached (:mod:`stillroom.methods.simclr`); its features on every training image become
pseudo-labels (:mod:`stillroom.domains.vision.pseudo_labels`, cached). The run's training batches get the
pseudo-labels as ``target_ids`` through the plan's ``replace_batches`` slot (new batches; the prepared
data keeps its labels, which the report still evaluates against).

The student (randomly initialised from ``classifier.student``) gets heads that live in the objective's
state (checkpointed with the player, resumed exactly, never saved with the student): an exit head
``P_i`` (:func:`~stillroom.models.projectors.build_projector`, ``unfused.projector``) on each tap of
``unfused.exits`` and a Linear classifier ``C`` on the final embedding ``q`` (``unfused.embedding``);
a ``layer.i`` tap of a stillroom MLP / CNN is taken after its ReLU. With ``z_i = P_i(q_i)``,
``z = C(q)`` and pseudo-label ``y``::

    L = alpha * sum_i CE(z_i, y) + CE(z, y) + beta * sum_i KL(softmax(z) || softmax(z_i))
        + gamma * sum_i (2 - 2 cos(z_i, z))

Each term is a pure function returning ``(sum over images, images)``. The saved student is the plain
classifier (its own class head untouched by this stage); fine-tune it on labels with an ordinary run
(``classifier.student_path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.config.unfused import UnfusedConfig
from stillroom.data.seeds import derive_seed
from stillroom.domains.vision.models import load_classifier
from stillroom.domains.vision.pseudo_labels import ClusterSettings, PseudoLabels, pseudo_labels
from stillroom.losses import LossResult
from stillroom.methods.base import Method, MethodContext, MethodPlan
from stillroom.methods.simclr import ssl_teacher
from stillroom.models.projectors import build_projector
from stillroom.models.taps import FeatureTap, resolve_tap
from stillroom.train.distributed import resolve_device
from stillroom.train.loop import Player
from stillroom.files import write_atomic

REPORT = "unfused.json"


def exit_ce(exit_logits_ebk: torch.Tensor, final_logits_bk: torch.Tensor, labels_b: torch.Tensor,
            alpha: float) -> tuple[torch.Tensor, int]:
    """``(sum, B)`` of ``alpha * sum_i CE(z_i, y) + CE(z, y)`` summed over the batch (``E`` exits, ``K`` classes)."""
    e = exit_logits_ebk.shape[0]
    exits = F.cross_entropy(exit_logits_ebk.flatten(0, 1).float(), labels_b.repeat(e), reduction="sum")
    final = F.cross_entropy(final_logits_bk.float(), labels_b, reduction="sum")
    return alpha * exits + final, labels_b.shape[0]


def _target(final_logits_bk: torch.Tensor, detach: bool) -> torch.Tensor:
    return final_logits_bk.detach() if detach else final_logits_bk


def exit_kl(exit_logits_ebk: torch.Tensor, final_logits_bk: torch.Tensor, beta: float,
            detach_target: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum, B)`` of ``beta * sum_i KL(softmax(z) || softmax(z_i))`` summed over the batch (``/ B`` is the
    released code's ``batchmean``); ``detach_target``: no gradient into ``z`` through this term."""
    logp_bk = F.log_softmax(_target(final_logits_bk, detach_target).float(), dim=-1)
    logq_ebk = F.log_softmax(exit_logits_ebk.float(), dim=-1)
    kl = (logp_bk.exp()[None] * (logp_bk[None] - logq_ebk)).sum()
    return beta * kl, final_logits_bk.shape[0]


def exit_cosine(exit_logits_ebk: torch.Tensor, final_logits_bk: torch.Tensor, gamma: float,
                detach_target: bool = True) -> tuple[torch.Tensor, int]:
    """``(sum, B)`` of ``gamma * sum_i (2 - 2 cos(z_i, z))`` summed over the batch (BYOL's normalised squared
    distance between exit and final logits); ``detach_target`` as :func:`exit_kl`."""
    cos_eb = F.cosine_similarity(exit_logits_ebk.float(), _target(final_logits_bk, detach_target).float()[None],
                                 dim=-1)
    return gamma * (2.0 - 2.0 * cos_eb).sum(), final_logits_bk.shape[0]


class MultiExitHeads(nn.Module):
    """The exits ``P_i`` (``tap width -> k``) and the final classifier ``C`` (``q width -> k``)."""

    def __init__(self, exit_dims: list[int], embedding_dim: int, k: int, projector: str):
        super().__init__()
        self.exits = nn.ModuleList([build_projector(projector, d, k) for d in exit_dims])
        self.final = nn.Linear(embedding_dim, k)


class MultiExitForward(nn.Module):
    """The player's forward: ``{"exit_logits": [E, B, k], "final_logits": [B, k]}`` from the taps of one
    student forward (stopped after the last tap: the student's own class head is not run)."""

    def __init__(self, model: nn.Module, heads: MultiExitHeads, exits: list[str], embedding: str):
        super().__init__()
        self.model, self.heads = model, heads
        self.exits, self.embedding = list(exits), embedding
        self._relu = {n: isinstance(resolve_tap(model, n)[1], (nn.Linear, nn.Conv2d)) for n in [*exits, embedding]}

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{tap: [B, D]}``: each tap flattened, after the ReLU for a Linear / Conv2d tap."""
        with FeatureTap(self.model, [*self.exits, self.embedding]) as tap:
            acts = tap.truncated(images)
        return {n: (F.relu(a) if self._relu[n] else a).flatten(1) for n, a in acts.items()}

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        q = self.features(batch.inputs)
        exit_logits = torch.stack([head(q[n]) for head, n in zip(self.heads.exits, self.exits)])
        return {"exit_logits": exit_logits, "final_logits": self.heads.final(q[self.embedding])}


def build_heads(model: nn.Module, s: UnfusedConfig, in_shape: tuple[int, ...], seed: int) -> MultiExitHeads:
    """Heads sized by one no-grad forward of a zero image, initialised from ``seed`` (global RNG untouched)."""
    probe = MultiExitForward(model, nn.Module(), s.exits, s.embedding)  # type: ignore[arg-type]
    with torch.no_grad():
        dims = {n: v.shape[1] for n, v in probe.features(torch.zeros(1, *in_shape, device=next(model.parameters()).device)).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiExitHeads([dims[n] for n in s.exits], dims[s.embedding], s.clusters, s.projector)


@dataclass
class UnfusedObjective:
    """:func:`exit_ce` + :func:`exit_kl` + :func:`exit_cosine` on ``batch.target_ids`` (the pseudo-labels)."""

    forward: MultiExitForward
    settings: UnfusedConfig

    @property
    def state(self) -> nn.Module:
        return self.forward.heads

    def signal(self, batch: Any) -> None:
        return None

    def loss(self, outputs: dict, batch: Any, signal: None) -> LossResult:
        s, z_e, z = self.settings, outputs["exit_logits"], outputs["final_logits"]
        ce, count = exit_ce(z_e, z, batch.target_ids[:, 0], s.alpha)
        kl, _ = exit_kl(z_e, z, s.beta, s.detach_target)
        cos, _ = exit_cosine(z_e, z, s.gamma, s.detach_target)
        parts = {"unfused_ce": float(ce.detach()), "unfused_kl": float(kl.detach()), "unfused_cos": float(cos.detach())}
        return LossResult(total=ce + kl + cos, count=count, parts=parts)

    def after_step(self, per_target: dict[str, float], step: int, total_steps: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}


def _teacher(ctx: MethodContext) -> tuple[nn.Module, str]:
    """The self-supervised encoder: ``unfused.teacher_path``, or SimCLR-lite trained here (cached)."""
    s: UnfusedConfig = ctx.cfg.unfused
    device = resolve_device(ctx.cfg.train.device, ctx.topology)
    if s.teacher_path is not None:
        folder = Path(s.teacher_path).expanduser()
        encoder = load_classifier(folder)
        if tuple(encoder.in_shape) != tuple(ctx.data.dataset.in_shape):
            raise ValueError(f"unfused.teacher_path={folder}: the encoder takes images {tuple(encoder.in_shape)}, "
                             f"the data set has {tuple(ctx.data.dataset.in_shape)}; point it at an encoder of "
                             f"{ctx.data.dataset.name!r} images")
        return encoder.to(device).eval(), f"loaded from {folder} ({encoder.describe()})"
    encoder, origin, _ = ssl_teacher(s.ssl, ctx.data, seed=ctx.cfg.seed, cache_dir=ctx.cfg.cache_dir, device=device,
                                     topology=ctx.topology, log=ctx.log)
    return encoder, origin


def _labels(ctx: MethodContext) -> tuple[PseudoLabels, str]:
    s: UnfusedConfig = ctx.cfg.unfused
    encoder, origin = _teacher(ctx)
    settings = ClusterSettings(s.pca_dim, s.whiten, s.clusters, s.kmeans_iters, derive_seed(ctx.cfg.seed, "kmeans") % 2 ** 32)
    labels = pseudo_labels(encoder, ctx.data.train, ctx.data.dataset.fingerprint(), settings,
                           cache_dir=ctx.cfg.cache_dir)
    d = labels.diagnostics
    ctx.log(f"unfused: {s.clusters} pseudo-classes ({labels.folder}); against the true labels: purity "
            f"{100 * d['purity']:.1f}%, NMI {d['nmi']:.3f}")
    return labels, origin


def _players(student: Player, ctx: MethodContext) -> list[Player]:
    s: UnfusedConfig = ctx.cfg.unfused
    heads = build_heads(student.model, s, ctx.data.dataset.in_shape, derive_seed(ctx.cfg.seed, "unfused-heads"))
    forward = MultiExitForward(student.model, heads, s.exits, s.embedding)
    return [Player(student.name, student.model, UnfusedObjective(forward, s), replace_batches=student.replace_batches,
                   weight_targets=student.weight_targets)]


def _write_report(run_dir: Path, labels: PseudoLabels, origin: str, s: UnfusedConfig) -> None:
    record = {"teacher": origin, "pseudo_labels": str(labels.folder), "clusters": s.clusters,
              "diagnostics": labels.diagnostics, "settings": s.model_dump(mode="json")}
    write_atomic(run_dir / REPORT, json.dumps(record, indent=2) + "\n")


def _build(ctx: MethodContext) -> MethodPlan:
    labels, origin = _labels(ctx)
    return plan_with_labels(ctx, labels, origin)


def plan_with_labels(ctx: MethodContext, labels: PseudoLabels, origin: str) -> MethodPlan:
    """The plan once the pseudo-labels exist: batches relabelled, the multi-exit player, ``unfused.json``."""

    def relabel(micro: list, step: int) -> list:
        return [replace(b, target_ids=labels.relabel(b.uids).to(b.target_ids.device)) for b in micro]

    return MethodPlan(replace_batches=relabel, players=lambda student: _players(student, ctx),
                      report=lambda run_dir: _write_report(run_dir, labels, origin, ctx.cfg.unfused))


METHOD = Method("unfused", build=_build, domains=("classifier",))
