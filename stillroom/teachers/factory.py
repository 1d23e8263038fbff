"""Build the teacher source a run asks for (``teacher.source``), checked before step 0."""

from __future__ import annotations

from pathlib import Path

import torch

from stillroom.config.schema import RunConfig
from stillroom.data.batch import Example
from stillroom.teachers.signal import Fingerprint


def store_path(cfg: RunConfig) -> Path:
    """``teacher.store.path``, or ``<output_dir>/<name>/teacher_store`` when it is null."""
    if cfg.teacher.store.path:
        return Path(cfg.teacher.store.path).expanduser()
    return Path(cfg.output_dir) / cfg.name / "teacher_store"


def build_teacher_source(
    cfg: RunConfig, *, teacher_model: torch.nn.Module | None, vocab_size: int, fingerprint: Fingerprint,
    hidden_layers: list[int], output_device: torch.device | str, train_examples: list[Example] | None = None,
):
    """An object with ``.signal(batch) -> TeacherSignal`` for ``cfg.teacher.source``.

    ``online``: :class:`~stillroom.teachers.online.OnlineTeacher` on ``teacher_model``.
    ``store``: :class:`~stillroom.teachers.store_reader.StoreTeacher`; the manifest is
    compared with the run (teacher identity, tokenizer hash, vocabulary, k, loss
    temperature, log-prob dtype, the fingerprint of ``train_examples``, hidden layers)
    here, before step 0, and a mismatch raises
    :class:`~stillroom.teachers.store_format.StoreMismatch` naming the fields.
    """
    source = cfg.teacher.source
    if source == "online":
        from stillroom.teachers.online import OnlineTeacher

        if teacher_model is None:
            raise ValueError("teacher.source=online needs the teacher model loaded")
        return OnlineTeacher(teacher_model, vocab_size=vocab_size, fingerprint=fingerprint,
                             hidden_layers=hidden_layers, output_device=output_device)
    if source == "store":
        from stillroom.teachers.store_format import data_fingerprint
        from stillroom.teachers.store_reader import StoreReader, StoreTeacher, run_expectation

        if train_examples is None:
            raise ValueError("teacher.source=store needs the training examples (to check the store's data fingerprint)")
        sc = cfg.teacher.store
        reader = StoreReader(store_path(cfg))
        expected = run_expectation(fingerprint=fingerprint, data_fingerprint=data_fingerprint(train_examples), k=sc.k,
                                   loss_temperature=cfg.loss.loss_temperature, logprob_dtype=sc.logprob_dtype)
        reader.check_run(expected, hidden_layers=hidden_layers)
        return StoreTeacher(reader, fingerprint=fingerprint, hidden_layers=hidden_layers, output_device=output_device)
    if source in ("remote", "ensemble"):
        raise NotImplementedError(
            f"teacher.source={source} is not wired into training yet; use teacher.source=online, or cache the "
            "teacher with `stillroom cache-teacher RECIPE` and train with teacher.source=store"
        )
    raise ValueError(f"unknown teacher.source {source!r}; valid: online, store, remote, ensemble")
