"""`stillroom generate RECIPE [key=value ...] [--export-only]`: teacher generations into a resumable store."""

from __future__ import annotations


def cmd_generate(args) -> int:
    from stillroom.cli.main import _load
    from stillroom.datagen.generate import run_generate

    cfg = _load(args)
    summary = run_generate(cfg, export_only=args.export_only)
    print(f"store: {summary['store']}")
    if summary["export"]:
        print(f"export: {summary['export']['path']} ({summary['export']['rows']} rows)")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="ask a teacher for completions, rationales or rewrites of a data set (resumable store + export)",
        description="Generate with the recipe's teacher (teacher.source online or remote) as `generate` says; "
        "rerun the same command to resume. See docs/GENERATE.md.",
    )
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (e.g. generate_rationales)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. generate.n_samples=4")
    p.add_argument("--export-only", action="store_true",
                   help="do not generate; summarise the existing store and write generate.export.path again")
    p.set_defaults(func=cmd_generate)
