"""Metric sinks: ``metrics.jsonl`` (always), TensorBoard / W&B when installed and asked for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


class MetricsLog:
    """Append-only JSONL of per-step records; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, *, resume_step: int | None, trackers: list[str], run_name: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._writers = []
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        for name in trackers:
            self._writers.append(_make_tracker(name, path.parent, run_name))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for w in self._writers:
            w(record)

    def close(self) -> None:
        for w in self._writers:
            close = getattr(w, "close", None)
            if close:
                close()


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def __call__(self, record: dict) -> None:
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_name: str):
        import wandb  # API key from WANDB_API_KEY, never from the recipe

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "stillroom"), name=run_name)

    def __call__(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        self.run.finish()


def _make_tracker(name: str, folder: Path, run_name: str):
    try:
        if name == "tensorboard":
            return _TensorBoard(folder)
        if name == "wandb":
            return _Wandb(run_name)
    except ImportError as exc:
        raise RuntimeError(
            f"train.trackers asks for {name}, which is not installed ({exc}); "
            f"`pip install stillroom[tracking]` or remove it from train.trackers"
        ) from exc
    raise ValueError(f"unknown tracker {name!r} (valid: tensorboard, wandb)")
