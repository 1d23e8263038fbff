"""``stillroom preference-data --export FILE --out DIR``: REDI's D_SFT and D_Pref from verified generations.

Flags: the fields of :class:`~stillroom.config.commands.PreferenceDataConfig`; the work:
:func:`stillroom.datagen.preference.make_preference_data`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import PreferenceDataConfig


def cmd_preference_data(cfg: PreferenceDataConfig) -> None:
    from stillroom.datagen.preference import make_preference_data

    make_preference_data(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "preference-data", PreferenceDataConfig, cmd_preference_data,
        help="REDI: write D_SFT (sft.jsonl) and D_Pref (pref.jsonl) from verified teacher generations",
        description="From `stillroom generate`'s export (--export; prompt_completion, keep: all, with a verifier) "
        "or from a generation store and its problems (--store with --items, checked by --verifier): every correct "
        "trace into <out>/sft.jsonl, one correct and one incorrect trace per problem into <out>/pref.jsonl. "
        "Prints the counts. See docs/methods/redi.md.",
    )
