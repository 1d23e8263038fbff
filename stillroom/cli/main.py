"""The ``stillroom`` command. Parses arguments and calls functions; no logic lives here."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from importlib import resources
from pathlib import Path


def _recipe_path(name: str) -> str:
    """A path as given, or the name of a recipe shipped with the package (``quickstart``)."""
    if Path(name).exists() or name.endswith((".yaml", ".yml")):
        return name
    shipped = resources.files("stillroom") / "recipes" / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    return name


def _load(args):
    from stillroom.config.load import load_config

    return load_config(_recipe_path(args.recipe) if args.recipe else None, args.overrides)


def cmd_validate(args) -> int:
    from stillroom.run import check_run

    cfg = _load(args)
    check_run(cfg)
    source = f", teacher source {cfg.teacher.source}" if cfg.domain == "lm" else ""
    print(f"{args.recipe}: OK ({cfg.method}, domain {cfg.domain}{source}, {len(cfg.loss.terms)} loss term(s))")
    return 0


def cmd_run(args) -> int:
    from stillroom.run import run

    run_dir = run(_load(args), resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from stillroom.run import evaluate_run

    evaluate_run(_load(args), student_dir=args.student)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stillroom", description="Knowledge distillation for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help_: str, func, recipe_required: bool = True):
        p = sub.add_parser(name, help=help_)
        if recipe_required:
            p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (e.g. quickstart)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=20")
        p.set_defaults(func=func)
        return p

    recipe_command("validate", "check a recipe without running it", cmd_validate)
    p = recipe_command("run", "train (and evaluate) as the recipe says", cmd_run)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last complete checkpoint")
    p = recipe_command("eval", "evaluate a finished run's student and rewrite its report", cmd_eval)
    p.add_argument("--student", default=None, help="student folder (default: <run folder>/student)")
    p = sub.add_parser("quickstart", help="distill SmolLM2-135M-Instruct into a 10-layer student, with a CE baseline")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_run, recipe="quickstart")  # `run` with the shipped quickstart recipe

    for module in ("stillroom.cli.teacher_commands", "stillroom.cli.serve_commands", "stillroom.cli.spec_eval",
                   "stillroom.cli.draft_data_command", "stillroom.cli.generate_command", "stillroom.cli.select_command",
                   "stillroom.cli.merge_command", "stillroom.cli.conditional_commands",
                   "stillroom.cli.preference_command"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after flags (`run R a=1 --resume b=2`): argparse leaves the later ones over.
    args, extra = parser.parse_known_args(argv)
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in late) or ' '.join(late)}")
    if late:
        args.overrides = list(args.overrides) + late
    from stillroom.config.load import ConfigError

    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for users; STILLROOM_DEBUG=1 for the traceback
        if os.environ.get("STILLROOM_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
