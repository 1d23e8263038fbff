"""FerKD (Shen 2023, arXiv 2312.17473): surgical soft/hard label adaptation of an image soft-label store.

A store-fed classifier run (``classifier.teacher_source: store``) trains each image on one of its ``R``
stored crop views per epoch (:mod:`stillroom.domains.vision.soft_labels`). FerKD adapts the stored labels
once, before step 0 (:func:`build_region_table`), from the store alone:

1. each view's teacher distribution ``p_T(r)`` ``[C]`` is rebuilt from its top-k by *marginal smoothing*
   (:func:`marginal_smoothing`): the stored tail mass ``1 - sum(top-k)`` (the store's ``tail_logmass``, after
   :func:`~stillroom.teachers.store_format.decode_logprobs` renormalised the K + 1 bins) is spread evenly,
   ``(1 - sum top-k) / (C - k)`` on every class outside the top k;
2. ``c_r = p_T(r)[y]``; per image the views are ranked by ``c_r`` (ties: lower view index first) and
   :func:`region_sets` marks the ``floor(discard_top_frac * R)`` most confident (and any ``c_r >= tau_high``)
   *discard*, the ``floor(calibrate_bottom_frac * R)`` least confident (and any ``c_r < tau_low``) *calibrate*,
   the rest *keep-soft* (discard wins where both apply);
3. :func:`adapted_targets`: keep-soft -> ``p_T(r)``; calibrate -> ``(1 - eps) onehot(y) + eps / C`` (or its
   ``mix_weight`` mix with ``p_T(r)``); discard -> ``p_T(r)``, never learned (weight 0).

In training (:class:`FerKDRun`), the batch-replacement slot turns each collated batch into a
:class:`FerKDBatch` carrying dense adapted targets ``[B, C]`` and a keep flag ``[B]`` (and, with SelfMix,
CutMixed inputs and mixed targets: :mod:`stillroom.domains.vision.selfmix`); the student's teacher source
becomes :class:`AdaptedTargets` (those targets as a dense signal), so the loss stays ``loss.terms``
(soft-CE) through the loss library; ``weight_targets`` gives dropped views weight 0 and the kept ones
``N / N_kept``, so the step's loss is the mean over kept views (the loop divides by N once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stillroom.config.methods import FerKDConfig
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.selfmix import draw_mix, mix_targets, paste_boxes
from stillroom.domains.vision.soft_labels import ImageSoftLabels, store_folder
from stillroom.domains.vision.views import apply_view
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts
from stillroom.teachers.signal import TeacherSignal
from stillroom.teachers.store_format import LOGPROB_TENSORS, decode_logprobs, write_json_atomic
from stillroom.train.loop import DistillObjective, Player

KEEP, CALIBRATE, DISCARD = 0, 1, 2
SET_NAMES = {KEEP: "keep_soft", CALIBRATE: "calibrate", DISCARD: "discard"}
REPORT_JSON = "ferkd_regions.json"


def marginal_smoothing(ids_nk: torch.Tensor, logprobs_nk: torch.Tensor, tail_n: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """``[N, C]`` probabilities from top-k ``ids``/``logprobs`` ``[N, K]`` and tail log-mass ``[N]``: the k
    stored classes keep their probability, the ``C - k`` others share the tail mass evenly (FKD's rule)."""
    n, k = ids_nk.shape
    rest = num_classes - k
    fill = tail_n.float().exp() / rest if rest else torch.zeros(n)
    probs = fill[:, None].expand(n, num_classes).clone()
    probs.scatter_(1, ids_nk.long(), logprobs_nk.float().exp())
    return probs


def region_sets(conf_nr: torch.Tensor, s: FerKDConfig) -> torch.Tensor:
    """``[N, R]`` set codes (:data:`KEEP`, :data:`CALIBRATE`, :data:`DISCARD`) from ``c_r`` ``[N, R]`` (see the
    module docstring: per-image ranks by fraction, or absolute thresholds; discard wins)."""
    n, r = conf_nr.shape
    order = torch.argsort(-conf_nr, dim=1, stable=True)  # most confident first, ties by view index
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(r).expand(n, r).contiguous())
    n_discard, n_calibrate = int(s.discard_top_frac * r), int(s.calibrate_bottom_frac * r)
    discard = rank < n_discard
    calibrate = rank >= r - n_calibrate
    if s.tau_high is not None:
        discard |= conf_nr >= s.tau_high
    if s.tau_low is not None:
        calibrate |= conf_nr < s.tau_low
    kind = torch.full((n, r), KEEP, dtype=torch.long)
    kind[calibrate] = CALIBRATE
    kind[discard] = DISCARD
    return kind


def smoothed_gt(labels_n: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """``[N, C]``: ``(1 - eps) onehot(y) + eps / C``."""
    onehot = torch.nn.functional.one_hot(labels_n.long(), num_classes).float()
    return (1.0 - eps) * onehot + eps / num_classes


def adapted_targets(probs_nrc: torch.Tensor, labels_n: torch.Tensor, kind_nr: torch.Tensor,
                    s: FerKDConfig) -> torch.Tensor:
    """``[N, R, C]`` training targets: ``p_T`` where kept (or dropped), the calibrated target where calibrated."""
    n, r, c = probs_nrc.shape
    gt = smoothed_gt(labels_n, c, s.eps)[:, None, :].expand(n, r, c)
    calibrated = gt if s.calibrate_target == "smoothed_gt" else s.mix_weight * gt + (1 - s.mix_weight) * probs_nrc
    return torch.where((kind_nr == CALIBRATE)[..., None], calibrated, probs_nrc)


@dataclass
class RegionTable:
    """FerKD's labels of every training image (row ``row_of[uid]``) and stored view: teacher probabilities
    ``probs_nrc``, ``conf_nr`` (c_r), set codes ``kind_nr``, adapted ``targets_nrc``; the views' boxes
    ``boxes_nr4`` (top, left, h, w) and ``flips_nr`` (for SelfMix's second crop)."""

    row_of: dict[str, int]
    labels_n: torch.Tensor
    probs_nrc: torch.Tensor
    conf_nr: torch.Tensor
    kind_nr: torch.Tensor
    targets_nrc: torch.Tensor
    boxes_nr4: torch.Tensor
    flips_nr: torch.Tensor

    def summary(self) -> dict:
        """Per set: number of views and their mean c_r."""
        out = {"images": len(self.row_of), "views_per_image": int(self.kind_nr.shape[1])}
        for code, name in SET_NAMES.items():
            picked = self.kind_nr == code
            mean = float(self.conf_nr[picked].mean()) if picked.any() else None
            out[name] = {"views": int(picked.sum()), "mean_c_r": mean}
        return out


def build_region_table(uids: list[str], labels_n: torch.Tensor, ids_nrk: torch.Tensor, logprobs_nrk: torch.Tensor,
                       tail_nr: torch.Tensor, boxes_nr4: torch.Tensor, flips_nr: torch.Tensor, num_classes: int,
                       s: FerKDConfig) -> RegionTable:
    """The :class:`RegionTable` of stored top-k labels ``[N, R, K]`` (see the module docstring)."""
    n, r, k = ids_nrk.shape
    probs = marginal_smoothing(ids_nrk.reshape(n * r, k), logprobs_nrk.reshape(n * r, k), tail_nr.reshape(-1),
                               num_classes).reshape(n, r, num_classes)
    conf = probs.gather(2, labels_n.long()[:, None, None].expand(n, r, 1))[..., 0]
    kind = region_sets(conf, s)
    return RegionTable({u: i for i, u in enumerate(uids)}, labels_n.long(), probs, conf, kind,
                       adapted_targets(probs, labels_n, kind, s), boxes_nr4.long(), flips_nr.bool())


def region_table_from_store(store: ImageSoftLabels, examples: list, s: FerKDConfig) -> RegionTable:
    """Read every view of every training image (``examples``) from ``store`` once and build the table."""
    r = store.views_per_image
    uids = [e.uid for e in examples for _ in range(r)]
    views = [v for _ in examples for v in range(r)]
    names = [x for x in LOGPROB_TENSORS if x in store.reader.shard(0)]
    got = store.gather(uids, views, ("topk_ids", "view_boxes", "view_flips", *names))
    lp, tail = decode_logprobs(got, 0, len(uids))
    n = len(examples)
    return build_region_table([e.uid for e in examples], torch.tensor([e.label for e in examples]),
                              got["topk_ids"].reshape(n, r, -1), lp.reshape(n, r, -1), tail.reshape(n, r),
                              got["view_boxes"].reshape(n, r, 4), got["view_flips"].reshape(n, r),
                              int(store.manifest["vocab_size"]), s)


@dataclass
class FerKDBatch(ImageBatch):
    """An :class:`ImageBatch` with FerKD's dense targets ``targets_bc`` ``[B, C]`` and ``keep_b`` ``[B]`` bool
    (False: a dropped view, weight 0)."""

    targets_bc: torch.Tensor | None = None
    keep_b: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "FerKDBatch":
        moved = ImageBatch.to(self, device)
        return FerKDBatch(moved.inputs, moved.target_ids, moved.uids, moved.target_weight, moved.view_ids,
                          self.targets_bc.to(device), self.keep_b.to(device))


class AdaptedTargets:
    """The student's teacher source under FerKD: a :class:`FerKDBatch`'s targets as dense "logits"
    ``T * log(target)`` ``[B, 1, C]``, so that the loss's softmax at ``loss.loss_temperature`` T returns the
    targets exactly (zero-probability classes are ``-inf``, which the loss terms treat as 0)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def signal(self, batch: Any) -> TeacherSignal:
        if getattr(batch, "targets_bc", None) is None:
            raise ValueError("method=ferkd: a batch without adapted targets reached the loss (replace_batches "
                             "must turn every training batch into a FerKDBatch)")
        return TeacherSignal(logits_btv=(self.temperature * batch.targets_bc.float().log())[:, None, :])


class FerKDRun:
    """One FerKD training run: the region table (built once, at the first need: after the run opened and
    checked the store), the batch replacement, the weights, the metrics and the report."""

    def __init__(self, settings: FerKDConfig, seed: int, examples: list, load_table: Callable[[], RegionTable],
                 temperature: float) -> None:
        self.settings, self.seed, self.temperature = settings, seed, temperature
        self.images = {e.uid: e.image for e in examples}
        self._load_table = load_table
        self._table: RegionTable | None = None
        self._last: dict[str, float] = {}
        self._last_lambda = 1.0

    @property
    def table(self) -> RegionTable:
        if self._table is None:
            self._table = self._load_table()
        return self._table

    def adapt(self, micro: list[ImageBatch], step: int) -> list[FerKDBatch]:
        """Each batch as a :class:`FerKDBatch` (its rows' adapted targets; SelfMix'ed where enabled)."""
        out = [self._adapt_one(b, step) for b in micro]
        kinds = torch.cat([self.table.kind_nr[self._rows(b), b.view_ids] for b in micro])
        self._last = {f"ferkd/{name}_frac": float((kinds == code).float().mean()) for code, name in SET_NAMES.items()}
        return out

    def _rows(self, batch: ImageBatch) -> torch.Tensor:
        if batch.view_ids is None:
            raise ValueError("method=ferkd needs stored views (classifier.teacher_source: store)")
        return torch.tensor([self.table.row_of[u] for u in batch.uids], dtype=torch.long)

    def _adapt_one(self, batch: ImageBatch, step: int) -> FerKDBatch:
        t, rows, v1 = self.table, self._rows(batch), batch.view_ids.long()
        targets_bc = t.targets_nrc[rows, v1]
        keep_b = t.kind_nr[rows, v1] != DISCARD
        inputs = batch.inputs
        if self.settings.selfmix:
            inputs, targets_bc = self._selfmix(batch, rows, v1, targets_bc, step)
        return FerKDBatch(inputs, batch.target_ids, batch.uids, None, batch.view_ids, targets_bc, keep_b)

    def _selfmix(self, batch: ImageBatch, rows: torch.Tensor, v1: torch.Tensor, targets_bc: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CutMix of each row's crop with a second stored crop of its image (:mod:`~stillroom.domains.vision.selfmix`)."""
        t, hw = self.table, tuple(batch.inputs.shape[-2:])
        draws = []
        for uid, row, first in zip(batch.uids, rows.tolist(), v1.tolist()):
            usable = (t.kind_nr[row] != DISCARD).nonzero().squeeze(1).tolist()
            draws.append(draw_mix(self.seed, step, uid, first, usable, self.settings.selfmix_alpha, hw))
        v2 = torch.tensor([d.second_view for d in draws], dtype=torch.long)
        images = torch.stack([self.images[u] for u in batch.uids])
        second = apply_view(images, t.boxes_nr4[rows, v2], t.flips_nr[rows, v2], hw).to(batch.inputs.dtype)
        inputs = paste_boxes(batch.inputs, second, [d.box for d in draws])
        lam = torch.tensor([d.lam for d in draws])
        self._last_lambda = float(lam.mean())
        return inputs, mix_targets(targets_bc, t.targets_nrc[rows, v2], lam)

    def weights(self, micro: list[FerKDBatch], counts: StepCounts) -> list[torch.Tensor]:
        """``[B, 1]`` per batch: 0 for dropped views, ``N / N_kept`` for kept ones (N_kept over all processes)."""
        kept = counts.all_reduce_sum(float(sum(int(b.keep_b.sum()) for b in micro)))
        scale = counts.targets / kept if kept else 0.0
        return [(b.keep_b.float() * scale)[:, None] for b in micro]

    def players(self, student: Player) -> list[Player]:
        """The student, its teacher source replaced by :class:`AdaptedTargets`; the table built here, once."""
        _ = self.table
        base = student.objective
        objective = DistillObjective(base.forward, base.mix, AdaptedTargets(self.temperature))
        return [Player(student.name, student.model, objective, student.updates_per_step,
                       replace_batches=student.replace_batches, weight_targets=student.weight_targets)]

    def metrics(self) -> dict[str, float]:
        extra = {"ferkd/selfmix_lambda": self._last_lambda} if self.settings.selfmix and self._last else {}
        return {**self._last, **extra}

    def report(self, run_dir: Path) -> Path:
        """``ferkd_regions.json``: the sets' sizes and mean c_r, and the settings (written atomically)."""
        path = Path(run_dir) / REPORT_JSON
        write_json_atomic(path, {**self.table.summary(), "settings": self.settings.model_dump()})
        return path


def _build(ctx: MethodContext) -> MethodPlan:
    cfg = ctx.cfg
    settings = cfg.ferkd or FerKDConfig()
    examples = ctx.data.train

    def load() -> RegionTable:
        table = region_table_from_store(ImageSoftLabels(store_folder(cfg)), examples, settings)
        s = table.summary()
        ctx.log("ferkd: " + ", ".join(f"{n} {s[n]['views']} views" for n in SET_NAMES.values())
                + f" of {s['images']} images x {s['views_per_image']}")
        return table

    run = FerKDRun(settings, cfg.seed, examples, load, cfg.loss.loss_temperature)
    return MethodPlan(replace_batches=run.adapt, weight_targets=run.weights, metrics=run.metrics,
                      report=run.report, players=run.players)


METHOD = Method("ferkd", build=_build, domains=("classifier",))
