"""``stillroom cache-teacher``: run the teacher once over a recipe's training data into a top-k store.

One orchestration for every domain: find the folder, read the settings a store already there records,
prepare the run, then write the shards the domain plans (:func:`stillroom.teachers.store_writer.write_store`:
atomic shards, resume after a kill). ``lm``: per token position of the training sequences
(:func:`_token_plan`; with ``teacher.tokenizer_mode: cross`` per teacher position of the student's sequences in
the teacher's tokens, :func:`_cross_token_plan`); ``classifier``: per crop view of the training images
(:func:`stillroom.domains.vision.soft_labels.image_store_plan`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.config.schema import RunConfig
from stillroom.run.training import prepare_run

Log = Callable[[str], None]


def cache_teacher(cfg: RunConfig, *, overwrite: bool = False, log: Log = print) -> Path:
    """Write the store the recipe describes for the training data of ``cfg`` (the method's view, the ones a
    store-fed run reads); a killed job resumes shard by shard. Returns the store folder.

    Resuming or repairing a store: settings the store records (``teacher.store.k``, ``logprob_dtype``,
    ``shard_tokens``; a classifier's ``classifier.store.k``, ``logprob_dtype``, ``views_per_image``,
    ``shard_images``) left at their defaults are read from the manifest of the store already in the folder
    (unless ``overwrite``), so rerunning the command without the overrides that first wrote the store
    finishes it or rewrites a corrupted shard."""
    from stillroom.config.load import ConfigError
    from stillroom.teachers.store_format import RECORDED, StoreError, read_manifest, recorded_settings
    from stillroom.teachers.store_sampled import signal_label
    from stillroom.teachers.store_writer import write_store

    if cfg.domain == "lm":
        from stillroom.teachers.factory import store_path

        folder, store_cfg, recorded, prefix = store_path(cfg), cfg.teacher.store, RECORDED, "teacher.store"
    elif cfg.domain == "classifier":
        from stillroom.domains.vision import soft_labels

        folder, store_cfg, recorded = soft_labels.store_folder(cfg), cfg.classifier.store, soft_labels.RECORDED
        prefix = "classifier.store"
    else:
        raise ConfigError(f"cache-teacher writes stores for domains lm and classifier, not {cfg.domain!r}; a "
                          f"{cfg.domain} run uses its teacher online")
    existing = None
    if not overwrite and (folder / "manifest.json").is_file():
        try:
            existing = read_manifest(folder)
        except StoreError:
            existing = None  # the writer says what is wrong with it
    settings, taken = recorded_settings(store_cfg, existing, recorded)
    if taken:
        log(f"teacher store {folder}: {', '.join(f'{prefix}.{n}={settings[n]}' for n in taken)} read from its "
            f"manifest (the recipe leaves {'it' if len(taken) == 1 else 'them'} at the default)")
    prep, method = prepare_run(cfg, log=log)
    if cfg.domain == "classifier":
        header, examples, compute, lengths = soft_labels.image_store_plan(cfg, prep, settings)
        log(f"caching the teacher into {folder}: {header.sequences} images x {header.views_per_image} views, "
            f"{header.num_shards} shard(s), k={header.k}, {header.logprob_dtype}")
    else:
        header, examples, compute, lengths = _token_plan(cfg, prep, method, settings)
        log(f"caching the teacher into {folder}: {header.sequences} sequences, {header.tokens} positions, "
            f"{header.num_shards} shard(s), k={header.k}, "
            + signal_label(header.signal, header.logprob_dtype, header.tail_draws))
    write_store(folder, header, examples, compute, overwrite=overwrite, log=log, lengths=lengths)
    log(soft_labels.ImageSoftLabels(folder).summary() if cfg.domain == "classifier" else _token_summary(folder))
    return folder


def _token_plan(cfg: RunConfig, prep, method, settings: dict):
    """``(header, training sequences, compute, None)`` of a language model's token store."""
    from stillroom.teachers.store_writer import make_header, model_compute

    sc = cfg.teacher.store
    k, logprob_dtype, shard_tokens = settings["k"], settings["logprob_dtype"], settings["shard_tokens"]
    if prep.cross is not None:
        return _cross_token_plan(cfg, prep, k, logprob_dtype, shard_tokens)
    mix = prep.loss_mix(prep.student, method)
    # Store what the recipe's loss terms will ask for, plus any layers requested explicitly.
    layers = sorted(set(sc.hidden_layers) | set(mix.teacher_hidden_layers))
    examples = prep.data.train
    header = make_header(
        examples, teacher_identity=prep.fingerprint.teacher, tokenizer_hash=prep.fingerprint.tokenizer_hash,
        vocab_size=prep.vocab_size, k=k, loss_temperature=cfg.loss.loss_temperature,
        logprob_dtype=logprob_dtype, hidden_layers=layers,
        hidden_size=getattr(getattr(prep.teacher_model, "config", None), "hidden_size", None),
        shard_tokens=shard_tokens, signal=sc.signal, tail_draws=sc.tail_draws, draw=sc.draw, draw_seed=sc.draw_seed,
        id_code=sc.id_code,
    )
    compute = model_compute(prep.teacher_model, k=k, loss_temperature=cfg.loss.loss_temperature,
                            vocab_size=prep.vocab_size, pad_id=prep.tokenizer.pad_token_id, hidden_layers=layers,
                            batch_size=sc.cache_batch_size or cfg.train.micro_batch_size, signal=sc.signal,
                            tail_draws=sc.tail_draws, draw=header.draw, draw_seed=header.draw_seed)
    return header, examples, compute, None


def _cross_token_plan(cfg: RunConfig, prep, k: int, logprob_dtype: str, shard_tokens: int):
    """``(header, teacher sequences, compute, None)`` of a cross-tokenizer store (``teacher.tokenizer_mode:
    cross``): the student's training sequences in the teacher's tokens (same uids), the teacher's top k at each
    of its positions at temperature 1, ids of its vocabulary (:mod:`stillroom.teachers.store_cross`)."""
    from stillroom.config.load import ConfigError
    from stillroom.teachers.store_cross import STORE_TEMPERATURE, cross_store_examples, cross_store_fields
    from stillroom.teachers.store_writer import make_header, model_compute

    sc = cfg.teacher.store
    if sc.hidden_layers:
        raise ConfigError(f"teacher.store.hidden_layers={sc.hidden_layers}: a cross-tokenizer store keeps no hidden "
                          "states (the teacher's positions are not the student's); remove the setting")
    fields = cross_store_fields(prep.cross, prep.fingerprint)
    examples = cross_store_examples(prep.cross, prep.data.train)
    header = make_header(examples, teacher_identity=prep.fingerprint.teacher, k=k, logprob_dtype=logprob_dtype,
                         loss_temperature=STORE_TEMPERATURE, shard_tokens=shard_tokens, id_code=sc.id_code,
                         **fields)
    compute = model_compute(prep.teacher_model, k=k, loss_temperature=STORE_TEMPERATURE,
                            vocab_size=prep.cross.teacher_vocab, pad_id=prep.cross.t.fill_id,
                            batch_size=sc.cache_batch_size or cfg.train.micro_batch_size)
    return header, examples, compute, None


def _token_summary(folder: Path) -> str:
    from stillroom.teachers.store_reader import StoreReader

    return StoreReader(folder).summary()
