"""What the loop hands a method about one optimizer step, and how it draws examples: a leaf module, so that the
loop (:mod:`stillroom.train.loop`) and the method seam (:mod:`stillroom.methods.base`, which re-exports both) need
not import each other's packages (importing ``stillroom.methods`` loads every method, and some load domains that
build players from the loop)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


class Sampler(Protocol):
    def next_indices(self) -> list[int]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class StepCounts:
    """What the loop counted for one optimizer step, handed to ``weight_targets``."""

    step: int
    targets: float
    """N: target tokens of the whole step (all micro-batches, summed over processes)."""
    all_reduce_sum: Callable[[float], float]
    """Sums a per-process count over processes (identity with one process)."""
