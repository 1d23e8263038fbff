"""The ``stillroom`` command. Parses arguments and calls functions; no logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

from stillroom.allocator import keep_freed_memory
from stillroom.cli import flag_commands, recipe_commands
from stillroom.cli.recipe_commands import load as _load  # noqa: F401 (kept for callers of the old names)
from stillroom.cli.recipe_commands import recipe_path as _recipe_path  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stillroom", description="Knowledge distillation: teachers into students.")
    sub = parser.add_subparsers(dest="command", required=True)
    recipe_commands.register(sub)
    flag_commands.register(sub)
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
    keep_freed_memory()  # large buffers reused, not page-faulted again at every step (stillroom/allocator.py)
    from stillroom.config.load import ConfigError

    try:
        return args.func(args) or 0
    except ConfigError as exc:  # a recipe, override or file the run names that cannot be used (check_run)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for users; STILLROOM_DEBUG=1 for the traceback
        if os.environ.get("STILLROOM_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        fix = _store_fix(args, exc)
        if fix:
            print(fix, file=sys.stderr)
        return 1


def _store_fix(args: argparse.Namespace, exc: Exception) -> str | None:
    """The full command that goes on after ``exc`` (its ``fix``), with this command's recipe and overrides,
    quoted for the shell: ``stillroom cache-teacher`` that repairs or replaces a teacher store
    (:attr:`StoreError.fix`), or ``stillroom run ... --resume`` after a remote teacher stopped a run; ``None``
    where no command helps or the command had no recipe (``verify-store``)."""
    import shlex

    fix = getattr(exc, "fix", None)
    if not getattr(args, "recipe", None):
        return None
    if fix == "resume_run":  # a run stopped by its remote teacher: the same command, continued
        words = ["stillroom", "run", args.recipe, *getattr(args, "overrides", []), "--resume"]
        return f"to continue once the teacher answers: {shlex.join(words)}"
    if fix not in ("resume", "overwrite"):
        return None
    overrides = [o for o in getattr(args, "overrides", [])
                 if not o.startswith(("teacher.source=", "classifier.teacher_source="))]
    words = ["stillroom", "cache-teacher", args.recipe, *overrides] + (["--overwrite"] if fix == "overwrite" else [])
    what = "finish or repair the store" if fix == "resume" else "replace the store with one for this run"
    return f"to {what}: {shlex.join(words)}"


if __name__ == "__main__":
    sys.exit(main())
