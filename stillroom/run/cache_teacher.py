"""``stillroom cache-teacher``: run the teacher once over a recipe's training data into a top-k store."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stillroom.config.schema import RunConfig
from stillroom.run.training import prepare_run


def cache_teacher(cfg: RunConfig, *, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the store ``teacher.store`` describes for the training sequences of ``cfg`` (the method's view, the
    ones a store-fed run reads); a killed job resumes shard by shard. Returns the store folder.

    Resuming or repairing a store: ``teacher.store.k``, ``logprob_dtype`` and ``shard_tokens`` left at their
    defaults are read from the manifest of the store already in the folder (unless ``overwrite``), so rerunning
    the command without the overrides that first wrote the store finishes it or rewrites a corrupted shard."""
    from stillroom.config.load import ConfigError
    from stillroom.teachers.factory import store_path
    from stillroom.teachers.store_format import StoreError, read_manifest, recorded_settings
    from stillroom.teachers.store_reader import StoreReader
    from stillroom.teachers.store_writer import make_header, model_compute, write_store

    if cfg.domain != "lm":
        raise ConfigError(f"cache-teacher writes token-level stores for language models (domain lm), not "
                          f"{cfg.domain!r}; a {cfg.domain} run uses its teacher online")
    folder = store_path(cfg)
    existing = None
    if not overwrite and (folder / "manifest.json").is_file():
        try:
            existing = read_manifest(folder)
        except StoreError:
            existing = None  # the writer says what is wrong with it
    settings, taken = recorded_settings(cfg.teacher.store, existing)
    prep, method = prepare_run(cfg, log=log)
    sc = cfg.teacher.store
    k, logprob_dtype, shard_tokens = settings["k"], settings["logprob_dtype"], settings["shard_tokens"]
    if taken:
        log(f"teacher store {folder}: {', '.join(f'teacher.store.{n}={settings[n]}' for n in taken)} read from its "
            f"manifest (the recipe leaves {'it' if len(taken) == 1 else 'them'} at the default)")
    mix = prep.loss_mix(prep.student, method)
    # Store what the recipe's loss terms will ask for, plus any layers requested explicitly.
    layers = sorted(set(sc.hidden_layers) | set(mix.teacher_hidden_layers))
    examples = prep.data.train
    header = make_header(
        examples, teacher_identity=prep.fingerprint.teacher, tokenizer_hash=prep.fingerprint.tokenizer_hash,
        vocab_size=prep.vocab_size, k=k, loss_temperature=cfg.loss.loss_temperature,
        logprob_dtype=logprob_dtype, hidden_layers=layers,
        hidden_size=getattr(getattr(prep.teacher_model, "config", None), "hidden_size", None),
        shard_tokens=shard_tokens,
    )
    compute = model_compute(prep.teacher_model, k=k, loss_temperature=cfg.loss.loss_temperature,
                            vocab_size=prep.vocab_size, pad_id=prep.tokenizer.pad_token_id, hidden_layers=layers,
                            batch_size=sc.cache_batch_size or cfg.train.micro_batch_size)
    log(f"caching the teacher into {folder}: {header.sequences} sequences, {header.tokens} positions, "
        f"{header.num_shards} shard(s), k={k}, {logprob_dtype}")
    write_store(folder, header, examples, compute, overwrite=overwrite, log=log)
    log(StoreReader(folder).summary())
    return folder
