"""The run folder ``<output_dir>/<name>/``: whose run it holds, how far it got, and the checks made on it
before any model loads.

* ``run.json``: the run's id (made when a new run starts; every checkpoint's train state carries it), when it
  started, and the evaluations before training (so that ``--resume`` does not repeat them);
* ``config.resolved.yaml``: the config with ``auto`` resolved, written once the run has started (or resumed);
* ``checkpoints/``, ``metrics.jsonl``, ``student/``, ``baseline/``, ``report.*``: what training and the report write.

A new run refuses a folder that holds a run unless told ``--overwrite`` (the old run's files are moved aside
inside the folder, then deleted; the teacher's outputs ``teacher_store/`` and ``remote_cache.jsonl`` and any
input the recipe reads from the folder stay) or ``--resume``, which first compares the config with the saved
one (:func:`check_resume`): only the settings of :data:`SAFE_TO_RESUME` may change.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from stillroom.config.load import ConfigError
from stillroom.train.checkpoint import checkpoint_run_id, checkpoint_step, latest_checkpoint
from stillroom.files import write_atomic  # noqa: F401 (re-exported: the run folder's writer)

RUN_JSON = "run.json"
CONFIG = "config.resolved.yaml"
RUN_FILES = (CONFIG, RUN_JSON, "checkpoints", "report.json", "report.md", "metrics.jsonl", "student", "baseline")
"""Any of these in a folder means it holds a run (``checkpoints`` only when it holds a checkpoint)."""
KEPT_INPUTS = ("teacher_store", "remote_cache.jsonl")
"""The teacher's outputs (written by ``cache-teacher``, or answered by a server): ``--overwrite`` keeps them."""
ASIDE = ".overwritten-"
SAFE_TO_RESUME = (
    "name", "output_dir", "cache_dir", "train.steps", "train.eval_every", "train.save_every", "train.log_every",
    "train.keep_checkpoints", "train.trackers", "train.threads", "eval", "generate", "select", "teacher.remote.url",
    "teacher.remote.api_key_env", "teacher.remote.concurrency", "teacher.remote.timeout_s",
    "teacher.remote.max_retries", "teacher.remote.backoff_s", "teacher.remote.max_backoff_s",
    "teacher.remote.max_retry_after_s", "teacher.store.cache_batch_size",
)
"""Settings (dotted prefixes) that ``--resume`` may change: how long to train and how to log, save and evaluate.
Everything else (data, models, loss, method settings, seed, batch sizes, precision, ...) shapes the training
state a checkpoint holds, and is refused."""


# ---------------------------------------------------------------- what the folder holds

def run_files(run_dir: Path) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``run_dir``."""
    found = []
    for name in RUN_FILES:
        path = run_dir / name
        if name == "checkpoints":
            if path.is_dir() and any(p.name.startswith("step_") or p.name == "latest" for p in path.iterdir()):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def read_run_json(run_dir: Path) -> dict:
    path = run_dir / RUN_JSON
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: unreadable ({err}); start a new run name, or --overwrite to start again") from None
    return data if isinstance(data, dict) else {}


def write_run_json(run_dir: Path, data: dict) -> None:
    """``run.json``, atomically (temporary file, fsync, rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / RUN_JSON, json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in {RUN_JSON}")


# ---------------------------------------------------------------- a new run

def refuse_existing(run_dir: Path) -> None:
    """A new run refuses a folder that holds a run: nothing there is touched."""
    found = run_files(run_dir)
    if found:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(found)}); nothing was changed. Continue it with --resume, "
            f"replace it with --overwrite (its files are deleted first), or choose another run name (name=...)"
        )


def clear_run_folder(run_dir: Path, keep: set[str], log: Callable[[str], None]) -> None:
    """Delete what an earlier run left in ``run_dir``, except ``keep`` (top-level names).

    Every entry is first renamed into ``run_dir/.overwritten-<pid>/`` (``run.json`` and
    ``config.resolved.yaml`` first, so a folder left half moved by a crash can no longer be resumed and is
    refused by a new run until ``--overwrite`` finishes the job); the aside folder is then deleted. The new
    run writes nothing before this has finished, so old and new files never mix."""
    if not run_dir.is_dir():
        return
    aside = run_dir / f"{ASIDE}{os.getpid()}"
    aside.mkdir(exist_ok=True)
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(ASIDE) and p.name not in keep]
    entries.sort(key=lambda p: (p.name not in (RUN_JSON, CONFIG), p.name))
    for path in entries:
        os.replace(path, aside / path.name)
    for old in run_dir.glob(f"{ASIDE}*"):
        shutil.rmtree(old, ignore_errors=True)
    kept = sorted(keep & {p.name for p in run_dir.iterdir()})
    log(f"--overwrite: deleted the earlier run in {run_dir}" + (f" (kept {', '.join(kept)})" if kept else ""))


def kept_inputs(run_dir: Path, inputs: list[Path]) -> set[str]:
    """Top-level names in ``run_dir`` that ``--overwrite`` keeps: the teacher's outputs and the folders of the
    files the recipe reads (``inputs``)."""
    keep = set(KEPT_INPUTS)
    root = run_dir.resolve()
    for path in inputs:
        try:
            rel = path.expanduser().resolve().relative_to(root)
        except ValueError:
            continue
        if rel.parts:
            keep.add(rel.parts[0])
    return keep


# ---------------------------------------------------------------- --resume

@dataclass
class Change:
    key: str
    old: Any
    new: Any

    @property
    def safe(self) -> bool:
        return any(self.key == p or self.key.startswith(p + ".") for p in SAFE_TO_RESUME)

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def config_changes(old: Any, new: Any, prefix: str = "") -> list[Change]:
    """Every setting that differs between two config trees, as dotted keys (list items by index)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            out += config_changes(old.get(key, _ABSENT), new.get(key, _ABSENT), dotted)
        return out
    nested = any(isinstance(v, (dict, list)) for v in (old if isinstance(old, list) else []) +
                 (new if isinstance(new, list) else []))
    if isinstance(old, list) and isinstance(new, list) and nested:
        out = []
        for i in range(max(len(old), len(new))):
            out += config_changes(old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT,
                                  f"{prefix}.{i}")
        return out
    return [] if old == new else [Change(prefix, old, new)]


@dataclass
class ResumeState:
    """What ``--resume`` found in the run folder (all read before any model loads)."""

    run_id: str | None
    step: int
    """The step of the last complete checkpoint (0: none)."""
    changes: list[Change] = field(default_factory=list)
    finished: bool = False
    eval_changed: bool = False
    legacy: bool = False
    """A run folder written before run ids existed (no ``run.json``)."""


def check_resume(run_dir: Path, resolved_yaml: str, *, steps: int, baseline: bool,
                 wall_steps: int | None = None) -> ResumeState | None:
    """Compare the resumed config with the saved ``config.resolved.yaml`` and the checkpoints with ``run.json``;
    raise :class:`ConfigError` (nothing changed) if the run cannot be resumed. ``None``: nothing to resume (a
    folder without a run), so the run starts anew. ``wall_steps``: with ``baseline_wall_time``, the steps
    recorded for the equal-wall-time baseline (``baseline_wall/``; 0: not decided yet, so not finished)."""
    saved_path = run_dir / CONFIG
    if not saved_path.is_file():
        found = run_files(run_dir)
        if not found:
            return None
        raise ConfigError(f"--resume: {run_dir} holds {', '.join(found)} but no {CONFIG}, so it cannot be resumed; "
                          f"nothing was changed. Start a new run name (name=...), or --overwrite to start it again")
    changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, yaml.safe_load(resolved_yaml))
    unsafe = [c for c in changes if not c.safe]
    if unsafe:
        safe = [str(c) for c in changes if c.safe]
        raise ConfigError(
            f"--resume: the config differs from the run's saved {saved_path} in settings a checkpoint depends on; "
            f"nothing was changed.\n" + "".join(f"  {c}\n" for c in unsafe) +
            "Only these may change on --resume: train.steps, train.eval_every, train.save_every, train.log_every, "
            "train.keep_checkpoints, train.trackers, train.threads, eval.*, cache_dir and the teacher.remote "
            "connection settings" + (f" (changed here too: {'; '.join(safe)})" if safe else "") + ".\n"
            f"To go on: resume with the saved config (drop those overrides, or pass the saved values), or start "
            f"a new run with these settings under another name (name=...), or --overwrite to start {run_dir} again")
    info = read_run_json(run_dir)
    run_id = info.get("run_id")
    state = ResumeState(run_id=run_id, step=0, changes=changes, legacy=run_id is None,
                        eval_changed=any(c.key.startswith("eval.") for c in changes))
    folders = [(run_dir, steps)] + ([(run_dir / "baseline", steps)] if baseline else [])
    folders += [(run_dir / "baseline_wall", wall_steps)] if wall_steps is not None else []
    at = []
    for folder, _ in folders:
        found = latest_checkpoint(folder / "checkpoints")
        if found is None:
            at.append(0)
            continue
        theirs = checkpoint_run_id(found)  # None: written by an older stillroom, before runs had ids
        if run_id is not None and theirs is not None and theirs != run_id:
            raise ConfigError(
                f"--resume: checkpoint {found} belongs to run {theirs}, but {run_dir / RUN_JSON} "
                f"is run {run_id}: it was left by another run; nothing was changed. Start a new run name (name=...), "
                f"or --overwrite to start {run_dir} again")
        at.append(checkpoint_step(found))
    state.step = at[0]
    if max(at[:2]) > steps:
        raise ConfigError(f"--resume: {run_dir} is at step {max(at[:2])}, past train.steps={steps}; nothing was "
                          f"changed. train.steps can only be raised on --resume (e.g. train.steps={max(at[:2])} or more)")
    state.finished = (all(s == want for s, (_, want) in zip(at, folders)) and wall_steps != 0
                      and (run_dir / "report.json").is_file())
    return state


# ---------------------------------------------------------------- what the report reuses

BEFORE_KEYS = ("teacher", "student_before")


def save_before(run_dir: Path, results: dict[str, dict]) -> None:
    """Keep the evaluations before training (``{model: metrics}``, with their generations) in ``run.json``."""
    models = {k: {m: v for m, v in r.items() if m not in ("generations", "prompts")} for k, r in results.items()}
    generations = {k: r["generations"] for k, r in results.items() if "generations" in r}
    prompts = next((r["prompts"] for r in results.values() if "prompts" in r), None)
    info = read_run_json(run_dir)
    info["before"] = {"models": models, "generations": generations, "prompts": prompts}
    write_run_json(run_dir, info)


def saved_before(run_dir: Path) -> dict[str, dict]:
    """The evaluations before training kept in ``run.json`` (or, for an older run, its ``report.json``), as
    ``{model: metrics}`` with ``generations`` / ``prompts`` where they were made."""
    before = read_run_json(run_dir).get("before")
    if before is None and (run_dir / "report.json").is_file():
        before = json.loads((run_dir / "report.json").read_text())
    if not isinstance(before, dict):
        return {}
    out = {}
    for key in BEFORE_KEYS:
        metrics = (before.get("models") or {}).get(key)
        if metrics is None:
            continue
        out[key] = dict(metrics)
        texts = (before.get("generations") or {}).get(key)
        if texts is not None and before.get("prompts") is not None:
            out[key].update(generations=texts, prompts=before["prompts"])
    return out


TRAINING_FIGURES = ("train_seconds", "steps", "median_step_s", "median_teacher_s", "final_train_loss")


def training_figures(metrics_file: Path) -> dict[str, Any]:
    """The report's training figures of a whole run (every session of a resumed one) from its ``metrics.jsonl``:
    steps, final loss, median step and teacher seconds over the logged steps, and the training seconds."""
    if not metrics_file.is_file():
        return {}
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("step_s"), (int, float))]
    if not rows:
        return {}
    last = rows[-1]
    seconds = last.get("train_s")
    if not isinstance(seconds, (int, float)):  # written before train_s was logged: the logged steps' time
        seconds = sum(r["step_s"] for r in rows)
    loss = last.get("loss")
    return {
        "train_seconds": round(float(seconds), 2), "steps": int(last["step"]),
        "median_step_s": statistics.median(r["step_s"] for r in rows),
        "median_teacher_s": statistics.median(r.get("teacher_s") or 0.0 for r in rows),
        "final_train_loss": float(loss) if isinstance(loss, (int, float)) else None,
    }
