"""``stillroom cache-teacher`` and ``stillroom verify-store``: write and check precomputed teacher stores."""

from __future__ import annotations

from pathlib import Path


def cmd_cache_teacher(args) -> int:
    from stillroom.cli.main import _load
    from stillroom.run import cache_teacher

    if args.batch_size is not None:  # kept for old command lines; the setting is teacher.store.cache_batch_size
        args.overrides = [*args.overrides, f"teacher.store.cache_batch_size={args.batch_size}"]
    cache_teacher(_load(args), overwrite=args.overwrite, log=lambda s: print(s, flush=True))
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
    p.add_argument("--batch-size", type=int, help="sequences per teacher forward (default: train.micro_batch_size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store written for another run (default: refuse)")
    p.set_defaults(func=cmd_cache_teacher)

    v = subparsers.add_parser("verify-store", help="check every shard of a teacher store against its sha256")
    v.add_argument("path", help="store folder (the one holding manifest.json)")
    v.set_defaults(func=cmd_verify_store)
