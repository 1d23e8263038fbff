"""The typed seam between a training method and the one training run.

A :class:`Method` says, before anything loads, how its records become sequences
(``encoder``: a :class:`~stillroom.data.encoders.RecordEncoder`, so the data pipeline
with its held-out split, bad-record policy, truncation and statistics exists once) and
whether it needs a steer split. Once the data and models are prepared, ``build``
receives a read-only :class:`MethodContext` and returns a :class:`MethodPlan`: what the
method changes in the training loop. Every slot is optional and typed:

* ``sampler``: how micro-batches are drawn (DDK's domain weights); its ``state_dict`` is
  checkpointed with the run;
* ``replace_batches(micro, step) -> micro``: new sequences for the step (on-policy
  samples); timed as ``generate_s``;
* ``weight_targets(micro, counts) -> [B, T] weights per micro-batch``: per-token loss
  weights, called *after* the loop has counted the step's target tokens ``N``
  (``counts.targets``, all micro-batches and processes), so no method recounts it;
* ``metrics() -> dict``: per-step metrics; ``report(run_dir)``: the method's own report files.
* ``players(student_player) -> [players]``: the players the loop steps (the student's, perhaps with another
  objective or optimizer, and extra ones such as a discriminator).

Cross-field checks of a method's settings are config validators
(:meth:`stillroom.config.methods.MethodSection.check_run`): they fail when the recipe is
loaded. A method never mutates prepared data: what the report measures and what the
baseline trains on are views the data pipeline built (:class:`~stillroom.data.pipeline.DataSplits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from stillroom.data.batch import Batch
from stillroom.train.counts import Sampler, StepCounts  # noqa: F401 (re-exported: the seam's types)

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig
    from stillroom.data.encoders import RecordEncoder
    from stillroom.data.pipeline import DataSplits
    from stillroom.losses import LossMix
    from stillroom.train.distributed import Topology




@dataclass(frozen=True)
class MethodContext:
    """What a method may read when it builds its part of one training run (nothing here is to be mutated)."""

    cfg: "RunConfig"
    run_dir: Path
    model: torch.nn.Module
    """The model this training run updates (the student, or the baseline's copy)."""
    data: "DataSplits"
    tokenizer: Any
    teacher_model: torch.nn.Module | None
    vocab_size: int
    topology: "Topology"
    mix: "LossMix"
    log: Callable[[str], None]


@dataclass
class MethodPlan:
    """What a method changes in one training run (see the module docstring); ``None``: nothing."""

    sampler: Callable[..., Sampler] | None = None
    replace_batches: Callable[[list[Batch], int], list[Batch]] | None = None
    weight_targets: Callable[[list[Batch], StepCounts], list[torch.Tensor]] | None = None
    metrics: Callable[[], dict[str, float]] | None = None
    report: Callable[[Path], object] | None = None
    report_rows: Callable[[], dict[str, dict]] | None = None
    """Extra report columns per model row (``{"student_after": {"ogen_hm": 0.61}}``), merged before the run's
    report is written: what the method trains that the domain's own evaluation does not see."""
    players: Callable[[Any], list[Any]] | None = None
    """The domain's student :class:`~stillroom.train.loop.Player` -> the players to train, in order (a method
    that changes the student's objective or optimizer, or adds a discriminator: MEAL V2)."""


@dataclass(frozen=True)
class Method:
    """One training method: its name (``RunConfig.method``), its data and its plan."""

    name: str
    encoder: Callable[["RunConfig"], "RecordEncoder"] | None = None
    """How a record becomes sequences (``None``: the record formats as they are)."""
    steer_fraction: Callable[["RunConfig"], float] | None = None
    """Fraction of the records set apart for the method to steer on (``None``: none)."""
    ce_only: bool = False
    """Train with cross-entropy on the data alone, whatever ``loss.terms`` say (``sft``; the baseline)."""
    build: Callable[[MethodContext], MethodPlan] | None = None
    """The plan of one training run (``None``: the loop as it is)."""
    domains: tuple[str, ...] | None = ("lm",)
    """The domains the method works in (``None``: every domain, as ``kd`` and ``sft``)."""
    outputs_per_class: Callable[["RunConfig"], int] | None = None
    """How many outputs the student's head has per class of the data, grouped: the class ``c``'s outputs are
    ``c*S .. c*S+S-1`` and its log-probability is their logsumexp (LELP's subclasses); ``None``: one per class."""

    def plan(self, ctx: MethodContext) -> MethodPlan:
        return MethodPlan() if self.build is None else self.build(ctx)
