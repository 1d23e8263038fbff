"""Progress of a training run: a rich bar on a terminal, a plain line every few seconds otherwise (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """A rich progress bar on a terminal; a plain line every few steps otherwise (CI logs)."""

    def __init__(self, total: int, start: int, enabled: bool, log: Callable[[str], None] = print,
                 unit: str = "targets"):
        self.enabled = enabled and total > start
        self.log = log
        self.unit = unit
        self.total = total
        self.bar = None
        self.last_print = 0.0
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

    def update(self, step: int, loss: float, rate: float, gen_share: float | None = None) -> None:
        """``gen_share``: fraction of the step spent preparing batches (on-policy generation)."""
        if not self.enabled:
            return
        gen = "" if gen_share is None else f"generate {100 * gen_share:.0f}% / train {100 * (1 - gen_share):.0f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate, gen=gen)
            return
        now = time.perf_counter()
        if now - self.last_print > 10 or step == self.total:
            self.last_print = now
            self.log(f"step {step}/{self.total} loss {loss:.4f} {rate:.0f} {self.unit}/s" + (f" {gen}" if gen else ""))
            sys.stdout.flush()  # CI logs are pipes: show progress as it happens

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
