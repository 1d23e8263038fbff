"""Progress of a training run: a rich bar on a terminal, plain lines otherwise (CI logs, pipes).

Off a terminal a line is printed at the first step, then every ``max(every, ceil(total / 20))``
steps (``every`` is ``train.log_every``), and always at the last step: a long run prints about 20
lines whatever its length, a short one a line every ``log_every`` steps (with ``log_every: 1``,
every step). The lines do not depend on how fast the steps are, so two runs of one recipe print
the same steps. ``min_interval_s`` (default 0: no limit) skips the lines due sooner than that after
the previous one, except the last step's.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

LINES = 20
"""About this many plain lines per run, at most (plus the first and the last step)."""


class Progress:
    """A rich progress bar on a terminal; a plain line every :meth:`interval` steps otherwise (CI logs)."""

    def __init__(self, total: int, start: int, enabled: bool, log: Callable[[str], None] = print,
                 unit: str = "targets", every: int = 1, min_interval_s: float = 0.0):
        self.enabled = enabled and total > start
        self.log = log
        self.unit = unit
        self.total = total
        self.start = start
        self.every = max(1, int(every))
        self.min_interval_s = min_interval_s
        self.bar = None
        self.last_print: float | None = None
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.0f} " + unit + "/s"),
                TextColumn("{task.fields[gen]}"), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), rate=0.0, gen="")
            self.bar.start()

    @property
    def interval(self) -> int:
        """Steps between two plain lines: ``max(every, ceil(total / 20))``."""
        return max(self.every, math.ceil(self.total / LINES))

    def due(self, step: int) -> bool:
        """Whether the plain line of ``step`` is printed (first step of this process, every :attr:`interval`
        steps, the last step)."""
        if step == self.total or self.last_print is None:
            return True
        if step % self.interval:
            return False
        return time.perf_counter() - self.last_print >= self.min_interval_s

    def update(self, step: int, loss: float, rate: float, gen_share: float | None = None) -> None:
        """``gen_share``: fraction of the step spent preparing batches (on-policy generation)."""
        if not self.enabled:
            return
        gen = "" if gen_share is None else f"generate {100 * gen_share:.0f}% / train {100 * (1 - gen_share):.0f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate, gen=gen)
            return
        if self.due(step):
            self.last_print = time.perf_counter()
            self.log(f"step {step}/{self.total} loss {loss:.4f} {rate:.0f} {self.unit}/s" + (f" {gen}" if gen else ""))
            sys.stdout.flush()  # CI logs are pipes: show progress as it happens

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
