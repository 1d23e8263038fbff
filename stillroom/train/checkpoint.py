"""Atomic checkpoints: ``checkpoints/step_NNNNNN/`` appears whole or not at all.

A checkpoint is written into ``checkpoints/.tmp-step_NNNNNN-<pid>/``, fsynced,
marked ``COMPLETE`` and renamed into place; only then is ``latest`` updated (also
by rename). ``save_checkpoint(..., background=True)`` does the same in a thread
(a run's final checkpoint, while the run evaluates: its tensors are not written
again); every function here that reads or writes checkpoints first waits for such
writes to the same folder (:func:`wait_for_writes`), so no reader sees a checkpoint
half done, and a failed write raises there. A training session waits for every
write before its first step: its tensors may be the ones being written, and on a
small machine the write's I/O would slow the steps it times. A kill at any moment leaves the last good checkpoint untouched; a
leftover temporary folder is ignored and removed by the next save. Pruning keeps
the checkpoint just written and the ``keep - 1`` newest before it, and deletes any
with a higher step (left by another run, or by a timeline the resume abandoned),
so ``latest`` always names a complete checkpoint of the run that is writing.

Contents: one ``<name>.safetensors`` per weight set (for each player: ``<player>``,
its model's state dict, and ``<player>.objective``, its objective's state: learned
loss parameters and schedule buffers, e.g. TAID), and
``train_state.{json,safetensors}`` (per player its optimizer and scheduler; the
sampler position, RNG states, step; the run id, readable from the JSON alone:
:func:`checkpoint_run_id`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stillroom.train.state_io import load_state, save_state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The CPU generator, Python's ``random`` and, where CUDA is in use, every visible GPU's generator (noise
    drawn on the device, as the generative domain's, resumes exactly only with it)."""
    py = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s generators; GPU states only onto as many visible GPUs as were saved (a run
    resumed on another machine shape restarts their streams: it cannot be exact there anyway)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


_pending: list[tuple[threading.Thread, list[BaseException], Path]] = []
"""Checkpoint writes running in threads (``save_checkpoint(..., background=True)``), oldest first: the thread, its
error (if any) and the checkpoint folder."""


def wait_for_writes(path: Path | None = None) -> None:
    """Wait for the checkpoint writes still running in threads, and raise the first one's error: every write, or
    (given ``path``) those of checkpoint folder ``path`` or of checkpoints directly under it."""
    where = os.path.abspath(path) if path is not None else None
    for entry in list(_pending):
        thread, errors, folder = entry
        if where is not None and where not in (os.path.abspath(folder), os.path.abspath(folder.parent)):
            continue
        _pending.remove(entry)
        thread.join()
        if errors:
            raise RuntimeError(f"writing checkpoint {folder} failed: {errors[0]}; the checkpoint before it is "
                               "intact, and a --resume continues from there") from errors[0]


def save_checkpoint(root: Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]], train_state: dict,
                    keep: int, background: bool = False) -> Path:
    """Write ``weights`` (``{file name: state dict}``) and ``train_state`` as ``step_NNNNNN`` atomically and point
    ``latest`` at it; keep it and the ``keep - 1`` newest complete checkpoints before it (see the module
    docstring). Returns the checkpoint folder.

    ``background``: return at once and write in a thread. The tensors are written as they are when the thread
    reads them, so the caller must not change them afterwards (a run's final checkpoint); the process still
    waits for the thread before it exits (not a daemon), and every reader here waits for it first."""
    wait_for_writes(root)
    final = root / f"step_{step:06d}"
    if not background:
        _write(root, step, weights, train_state, keep)
        return final
    errors: list[BaseException] = []

    def write() -> None:
        try:
            _write(root, step, weights, train_state, keep)
        except BaseException as err:  # noqa: BLE001 (raised again by wait_for_writes, in the caller's thread)
            errors.append(err)

    thread = threading.Thread(target=write, name=f"checkpoint {final}")
    _pending.append((thread, errors, final))
    thread.start()
    return final


def _write(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]], train_state: dict, keep: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    tmp.mkdir()
    for name, state in weights.items():
        _save_deduplicated(state, tmp / f"{name}.safetensors")
    save_state(train_state, tmp, "train_state")
    (tmp / "COMPLETE").write_text(str(step))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    others = [p for p in _complete(root) if p.name != final.name]
    earlier = [p for p in others if checkpoint_step(p) < step]
    doomed = [p for p in others if checkpoint_step(p) > step] + earlier[: max(0, len(earlier) - (max(keep, 1) - 1))]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def _save_deduplicated(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): store each once,
    and the other names as aliases in the file's metadata."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def _load_deduplicated(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for name, target in aliases.items():
        state[name] = state[target]
    return state


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, by step."""
    wait_for_writes(root)
    return _complete(root)


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of checkpoint folder ``step_NNNNNN``."""
    return int(folder.name.removeprefix("step_"))


def checkpoint_run_id(folder: Path) -> str | None:
    """The id of the run that wrote the checkpoint in ``folder`` (``None``: written before runs had ids)."""
    wait_for_writes(folder)
    try:
        state = json.loads((folder / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    run_id = state.get("run_id") if isinstance(state, dict) else None
    return run_id if isinstance(run_id, str) else None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` if it is valid, else the highest step)."""
    wait_for_writes(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "COMPLETE").is_file():
            return candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(folder: Path, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``({name: state dict}, train_state)`` of the checkpoint in ``folder``; ``names``: the weight sets to read."""
    wait_for_writes(folder)
    if not (folder / "COMPLETE").is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no COMPLETE marker)")
    missing = [n for n in names if not (folder / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} has no weights for {missing} (it was written by another kind "
                                "of run); start a new run or resume the run that wrote it")
    weights = {n: _load_deduplicated(folder / f"{n}.safetensors") for n in names}
    return weights, load_state(folder, "train_state")
