"""Build the teacher source a run asks for (``teacher.source``), checked before step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from stillroom.config.schema import RunConfig, TeacherConfig
from stillroom.data.batch import Example
from stillroom.teachers.signal import Fingerprint


def store_path(cfg: RunConfig) -> Path:
    """``teacher.store.path``, or ``<output_dir>/<name>/teacher_store`` when it is null."""
    if cfg.teacher.store.path:
        return Path(cfg.teacher.store.path).expanduser()
    return cfg.run_dir / "teacher_store"


def build_teacher_source(
    cfg: RunConfig, *, teacher_model: torch.nn.Module | None, vocab_size: int, fingerprint: Fingerprint,
    hidden_layers: list[int], output_device: torch.device | str, train_examples: list[Example] | None = None,
    attentions: bool = False, log: Callable[[str], None] = print, cross=None,
):
    """An object with ``.signal(batch) -> TeacherSignal`` for ``cfg.teacher.source``.

    ``online``: :class:`~stillroom.teachers.signal.OnlineTeacher` on ``teacher_model``.
    ``store``: :class:`~stillroom.teachers.store_reader.StoreTeacher`; the manifest is
    compared with the run (teacher identity, tokenizer hash, vocabulary, k, loss
    temperature, log-prob dtype, the fingerprint of ``train_examples``, hidden layers)
    here, before step 0, and a mismatch raises
    :class:`~stillroom.teachers.store_format.StoreMismatch` naming the fields. ``k`` and
    ``logprob_dtype`` left at their defaults are read from the manifest
    (:func:`~stillroom.teachers.store_format.recorded_settings`); ``log`` gets the line
    ``teacher: store PATH (k=..., DTYPE, N positions)``.
    ``remote``: :class:`~stillroom.teachers.remote.RemoteTeacher` (server checked now); in a VLM run
    (``cfg.vlm``) a :class:`~stillroom.teachers.remote_vlm.RemoteVlmTeacher`, whose rows send the images of
    ``train_examples``. An online ensemble member of a VLM run must be a VLM reading the run's pixels.
    ``ensemble``: :class:`~stillroom.teachers.ensemble.EnsembleTeacher` over
    ``teacher.ensemble`` members, each built by these same rules.
    ``cross`` (a :class:`~stillroom.teachers.cross_align.CrossVocab`, ``teacher.tokenizer_mode: cross``): the
    online teacher reads the student's text in its own tokens (:class:`~stillroom.teachers.cross.CrossTeacher`).
    """
    if cross is not None:
        return _cross_teacher(cfg, teacher_model, cross, output_device, fingerprint=fingerprint,
                              train_examples=train_examples, log=log)
    common = dict(vocab_size=vocab_size, fingerprint=fingerprint, hidden_layers=hidden_layers,
                  output_device=output_device, train_examples=train_examples, attentions=attentions, log=log)
    return _build(cfg, cfg.teacher, teacher_model=teacher_model, member=None, **common)


def _remembered(cfg: RunConfig, tcfg: TeacherConfig, online, where: str, log: Callable[[str], None]):
    """``teacher.memo: true``: the online teacher kept per training sequence as ``teacher.store`` says."""
    from stillroom.teachers.memo import MemoTeacher

    sc = tcfg.store
    log(f"{where}: online, remembered per training sequence ({sc.signal}, k={sc.k}"
        + (f" + {sc.tail_draws} tail draws" if sc.signal == "topk_sampled" else "") + ")")
    return MemoTeacher(online, signal=sc.signal, k=sc.k, tail_draws=sc.tail_draws, draw=sc.draw,
                       draw_seed=sc.draw_seed, loss_temperature=cfg.loss.loss_temperature)


def _build(cfg: RunConfig, tcfg: TeacherConfig, *, teacher_model, member: int | None, vocab_size: int,
           fingerprint: Fingerprint, hidden_layers: list[int], output_device, train_examples, attentions: bool,
           log: Callable[[str], None] = print):
    source = tcfg.source
    where = "teacher" if member is None else f"teacher.ensemble.{member}"
    if source == "online":
        from stillroom.models import use_eager_attention
        from stillroom.teachers.signal import OnlineTeacher

        if member is not None and tcfg.model != cfg.teacher.model:
            teacher_model, fingerprint = _load_member(cfg, tcfg, where, fingerprint)
            if cfg.vlm is not None:  # another LLaVA folder: it must read the run's pixels as they are
                from stillroom.teachers.remote_vlm import check_vlm_member

                check_vlm_member(teacher_model, tcfg.model.path, train_examples or [], where)
        if teacher_model is None:
            raise ValueError(f"{where}.source=online needs the teacher model loaded")
        if attentions:
            use_eager_attention(teacher_model)
        online = OnlineTeacher(teacher_model, vocab_size=vocab_size, fingerprint=fingerprint,
                               hidden_layers=hidden_layers, attentions=attentions, output_device=output_device)
        return _remembered(cfg, tcfg, online, where, log) if tcfg.memo else online
    if source == "store":
        from stillroom.config.load import ConfigError
        from stillroom.teachers.store_format import data_fingerprint, recorded_settings, taken_note
        from stillroom.teachers.store_reader import StoreReader, StoreTeacher, run_expectation
        from stillroom.teachers.store_sampled import signal_label

        if train_examples is None:
            raise ValueError("teacher.source=store needs the training examples (to check the store's data fingerprint)")
        sc = tcfg.store
        if member is not None and not sc.path:
            raise ConfigError(f"{where}.store.path is required for a store member of an ensemble")
        reader = StoreReader(Path(sc.path).expanduser() if member is not None else store_path(cfg))
        if member is not None:  # a member store names its own teacher; everything else must match the run
            identity = (reader.manifest.get("teacher") or {}).get("identity", fingerprint.teacher)
            fingerprint = Fingerprint(identity, fingerprint.tokenizer_hash, fingerprint.vocab_size)
        settings, taken = recorded_settings(sc, reader.manifest, ("k", "logprob_dtype"))
        expected = run_expectation(fingerprint=fingerprint, data_fingerprint=data_fingerprint(train_examples),
                                   k=settings["k"], loss_temperature=cfg.loss.loss_temperature,
                                   logprob_dtype=settings["logprob_dtype"], signal=sc.signal)
        reader.check_run(expected, hidden_layers=hidden_layers)
        kind = signal_label(reader.signal, reader.manifest["logprob_dtype"], reader.width - reader.k)
        log(f"{where}: store {reader.folder} (k={reader.k}, {kind}, "
            f"{reader.manifest['tokens']} positions){taken_note(f'{where}.store', taken)}")
        return StoreTeacher(reader, fingerprint=fingerprint, hidden_layers=hidden_layers, output_device=output_device)
    if source == "remote":
        from stillroom.teachers.remote import remote_from_run

        if hidden_layers or attentions:
            raise ValueError(f"{where}.source=remote gives log-probabilities only; hidden-state and attention "
                             "loss terms need an online teacher or a store with hidden states")
        run_cfg = cfg if member is None else cfg.model_copy(update={"teacher": tcfg, "name": f"{cfg.name}/member{member}"})
        if cfg.vlm is not None:  # each row sends its image too (stillroom.teachers.remote_vlm)
            from stillroom.teachers.remote_vlm import remote_vlm_from_run, tokens_per_image

            examples = train_examples or []
            return remote_vlm_from_run(run_cfg, vocab_size=vocab_size, fingerprint=fingerprint, examples=examples,
                                       tokens_per_image=tokens_per_image(teacher_model))
        return remote_from_run(run_cfg, vocab_size=vocab_size, fingerprint=fingerprint)
    if source == "ensemble":
        from stillroom.teachers.ensemble import ensemble_from_run

        if hidden_layers or attentions:
            raise ValueError("teacher.source=ensemble averages output distributions; hidden-state and attention "
                             "terms need a single teacher")

        def build_member(member_cfg: TeacherConfig, index: int):
            return _build(cfg, member_cfg, teacher_model=teacher_model, member=index, vocab_size=vocab_size,
                          fingerprint=fingerprint, hidden_layers=[], output_device=output_device,
                          train_examples=train_examples, attentions=False, log=log)

        return ensemble_from_run(tcfg, build_member, vocab_size=vocab_size)
    raise ValueError(f"unknown {where}.source {source!r}; valid: online, store, remote, ensemble")


def _load_member(cfg: RunConfig, tcfg: TeacherConfig, where: str, run_fingerprint: Fingerprint):
    """Load an online ensemble member that is not the run's teacher; it must share the tokenizer."""
    from stillroom.models import load_model, tokenizer_hash
    from stillroom.models.precision import weights_dtype

    loaded = load_model(tcfg.model, dtype=weights_dtype(tcfg.dtype, tcfg.device), cache_dir=cfg.cache_dir)
    if tokenizer_hash(loaded.tokenizer) != run_fingerprint.tokenizer_hash:
        raise ValueError(f"{where}: this teacher's tokenizer differs from the run's; ensemble members must share it")
    model = loaded.model.to(tcfg.device).eval()
    return model, Fingerprint(loaded.identity, run_fingerprint.tokenizer_hash, run_fingerprint.vocab_size)


def _cross_teacher(cfg: RunConfig, teacher_model: torch.nn.Module | None, cross, output_device, **common):
    """The teacher of a cross-tokenizer run (``teacher.source``); ``uld`` terms decide which ranked supports it
    computes. Online: the whole distribution at each aligned position; store and remote: the teacher's top k
    at its own positions, turned into the same targets (:func:`~stillroom.teachers.cross_topk.cross_from_topk`)."""
    supports = {t.params.get("support", "all") for t in cfg.loss.terms if t.name == "uld"}
    source = cfg.teacher.source
    if source == "online":
        return _cross_online(cfg, teacher_model, cross, output_device, supports)
    if source == "remote":
        return _cross_remote(cfg, cross, output_device, supports, **common)
    if source == "store":
        return _cross_store(cfg, cross, output_device, supports, **common)
    if source == "ensemble":
        from stillroom.teachers.ensemble import ensemble_from_run

        def build_member(member_cfg: TeacherConfig, index: int):
            member_run = cfg.model_copy(update={"teacher": member_cfg, "name": f"{cfg.name}/member{index}"})
            model = teacher_model
            if member_cfg.source == "online" and member_cfg.model != cfg.teacher.model:
                model = _cross_member_model(cfg, member_cfg, cross, f"teacher.ensemble.{index}")
            return _cross_teacher(member_run, model, cross, output_device, **common)

        return ensemble_from_run(cfg.teacher, build_member, vocab_size=cross.student_vocab)
    raise ValueError(f"teacher.tokenizer_mode=cross does not support teacher.source={source!r}")


def _cross_member_model(cfg: RunConfig, tcfg: TeacherConfig, cross, where: str) -> torch.nn.Module:
    """An online member of a cross-tokenizer ensemble other than the run's teacher: it must read text with the
    run teacher's tokenizer (one matched vocabulary for the whole ensemble)."""
    from stillroom.models import load_model, tokenizer_hash
    from stillroom.models.precision import weights_dtype

    loaded = load_model(tcfg.model, dtype=weights_dtype(tcfg.dtype, tcfg.device), cache_dir=cfg.cache_dir)
    if tokenizer_hash(loaded.tokenizer) != tokenizer_hash(cross.teacher_tok):
        raise ValueError(f"{where}: this teacher's tokenizer differs from the run teacher's (teacher.model); the "
                         "members of a cross-tokenizer ensemble share one teacher tokenizer")
    return loaded.model.to(tcfg.device).eval()


def _cross_online(cfg: RunConfig, teacher_model: torch.nn.Module | None, cross, output_device, supports):
    from stillroom.teachers.cross import CrossTeacher

    if teacher_model is None:
        raise ValueError("teacher.tokenizer_mode=cross with teacher.source=online needs the teacher model loaded")
    return CrossTeacher(teacher_model, cross, temperature=cfg.loss.loss_temperature, supports=supports,
                        rank_k=cfg.teacher.cross.rank_k, chunk_rows=cfg.teacher.cross.chunk_rows,
                        output_device=output_device)


def _cross_remote(cfg: RunConfig, cross, output_device, supports, **common):
    """:class:`~stillroom.teachers.remote_cross.RemoteCrossTeacher`: the teacher's tokens of each row go to the
    server, its top-k at teacher positions become the targets; the server is checked now."""
    from stillroom.teachers.remote_cross import remote_cross_from_run

    return remote_cross_from_run(cfg, cross, supports=supports, output_device=output_device,
                                 fingerprint=common.get("fingerprint"))


def _cross_store(cfg: RunConfig, cross, output_device, supports, **common):
    """:class:`~stillroom.teachers.store_cross.CrossStoreTeacher`: the teacher's top-k at its own positions,
    written by ``stillroom cache-teacher`` of the same recipe; the manifest is checked against the run now."""
    from stillroom.teachers.store_cross import cross_store_teacher

    return cross_store_teacher(cfg, store_path(cfg), cross, output_device, supports, **common)
