"""``stillroom cache-teacher`` and ``stillroom verify-store``: write and check precomputed teacher stores."""

from __future__ import annotations

from pathlib import Path


def cmd_cache_teacher(args) -> int:
    from stillroom.cli.main import _load
    from stillroom.losses import LossMix
    from stillroom.teachers.factory import store_path
    from stillroom.teachers.store_reader import StoreReader
    from stillroom.teachers.store_writer import make_header, model_compute, write_store
    from stillroom.train.run import prepare

    cfg = _load(args)
    p = prepare(cfg)
    sc = cfg.teacher.store
    teacher_cfg = getattr(p.teacher_model, "config", None)
    student_cfg = getattr(p.student, "config", None)
    mix = LossMix(cfg.loss, student_hidden=getattr(student_cfg, "hidden_size", None),
                  teacher_hidden=getattr(teacher_cfg, "hidden_size", None),
                  student_layers=getattr(student_cfg, "num_hidden_layers", None),
                  teacher_layers=getattr(teacher_cfg, "num_hidden_layers", None))
    # Store what the recipe's loss terms will ask for, plus any layers requested explicitly.
    layers = sorted(set(sc.hidden_layers) | set(mix.teacher_hidden_layers))
    folder = store_path(cfg)
    header = make_header(
        p.splits.train, teacher_identity=p.fingerprint.teacher, tokenizer_hash=p.fingerprint.tokenizer_hash,
        vocab_size=p.vocab_size, k=sc.k, loss_temperature=cfg.loss.loss_temperature, logprob_dtype=sc.logprob_dtype,
        hidden_layers=layers, hidden_size=getattr(teacher_cfg, "hidden_size", None), shard_tokens=sc.shard_tokens,
    )
    batch_size = args.batch_size or cfg.train.micro_batch_size
    compute = model_compute(p.teacher_model, k=sc.k, loss_temperature=cfg.loss.loss_temperature,
                            vocab_size=p.vocab_size, pad_id=p.tokenizer.pad_token_id, hidden_layers=layers,
                            batch_size=batch_size)
    print(f"caching the teacher into {folder}: {header.sequences} sequences, {header.tokens} positions, "
          f"{header.num_shards} shard(s), k={sc.k}, {sc.logprob_dtype}", flush=True)
    write_store(folder, header, p.splits.train, compute, overwrite=args.overwrite,
                log=lambda s: print(s, flush=True))
    print(StoreReader(folder).summary())
    print(f"train from it with: stillroom run {' '.join([args.recipe, *args.overrides])} teacher.source=store")
    return 0


def cmd_verify_store(args) -> int:
    from stillroom.teachers.store_reader import StoreReader

    reader = StoreReader(Path(args.path))
    checked = reader.verify()
    print(reader.summary())
    print(f"OK: {len(reader.shards)} shard(s), {checked} bytes match their sha256")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache-teacher",
        help="run the teacher once over the recipe's training data and write a top-k store (teacher.store.*)",
    )
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. teacher.store.k=32")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per teacher forward (default: train.micro_batch_size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store written for another run (default: refuse)")
    p.set_defaults(func=cmd_cache_teacher)

    v = subparsers.add_parser("verify-store", help="check every shard of a teacher store against its sha256")
    v.add_argument("path", help="store folder (the one holding manifest.json)")
    v.set_defaults(func=cmd_verify_store)
