"""What a domain brings to the one core: data to batches, models, the teacher signal, report metrics.

Causal language models are the first domain (:mod:`stillroom.domains.lm`), image
classifiers the second (:mod:`stillroom.domains.vision`); vision-language models and
generators follow. The loop, players, checkpoints, exact resume, distributed setup,
the run folder and the report layout are shared (:mod:`stillroom.run`).

A domain's :meth:`Domain.prepare` loads and checks everything a run needs before step
0 and returns a :class:`PreparedRun`, which the orchestration asks for training jobs
(one per trained model: the student, the CE baseline), evaluations and saved models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig
    from stillroom.methods.base import Method, MethodPlan
    from stillroom.train.distributed import Topology
    from stillroom.train.loop import TrainJob

Log = Callable[[str], None]


class PreparedRun(Protocol):
    """A run's models and data, loaded and checked before step 0."""

    cfg: "RunConfig"
    topology: "Topology"
    device: torch.device
    student: torch.nn.Module
    """The student as it starts (what ``baseline: true`` copies)."""
    teacher_model: torch.nn.Module | None
    """The teacher as the report measures it (``None`` where it is not loaded in process)."""
    data: Any
    """The data splits: ``train`` (the method's view), ``heldout``, ``baseline_train``, ``baseline_heldout``."""

    def job(self, model: torch.nn.Module, method: "Method", *, baseline: bool, run_dir: Path, resume: bool,
            log: Log) -> tuple["TrainJob", "MethodPlan"]:
        """The training job that trains ``model`` with ``method`` (on the data's method view, or its plain view
        for the CE baseline), and the method's plan. Every check that can refuse the run happens here."""
        ...

    def evaluate(self, models: dict[str, tuple[torch.nn.Module, list]], log: Log, *,
                 timed: bool = True) -> dict[str, dict]:
        """Report metrics per named model, each measured on its held-out examples. Speed is timed for the
        group at once; a group without ``"teacher"`` times the teacher beside it and returns a ``"teacher"``
        row holding that speed alone (merge it with :func:`merge_rows`), so speed ratios compare one
        measurement. ``timed=False``: no speed (the models before training: the run times them after training
        beside the students, :func:`stillroom.run.training.speed_before`); domains that time nothing ignore it."""
        ...

    def save_model(self, model: torch.nn.Module, folder: Path) -> None:
        """A trained model as a folder its library loads without stillroom (written atomically)."""
        ...

    def load_model(self, folder: Path) -> torch.nn.Module:
        """A model :meth:`save_model` wrote."""
        ...

    def report_notes(self) -> list[str]:
        """Lines for the report's notes (data statistics, the student's origin)."""
        ...


class Domain(Protocol):
    name: str

    def prepare(self, cfg: "RunConfig", topology: "Topology", method: "Method", log: Log) -> PreparedRun:
        ...


def merge_rows(rows: dict[str, dict], new: dict[str, dict]) -> dict[str, dict]:
    """``rows`` updated per model with ``new``'s rows, key by key (a speed-only teacher row updates the teacher's
    speed and keeps its other metrics)."""
    return {**rows, **{name: {**rows.get(name, {}), **row} for name, row in new.items()}}
