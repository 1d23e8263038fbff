"""The ``stillroom`` command. Parses arguments and calls functions; no logic lives here."""

from __future__ import annotations

import argparse
import os
import sys

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
