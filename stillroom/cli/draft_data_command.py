"""``stillroom draft-data --target MODEL --out FILE``: a draft model's distillation data from the target.

Flags: the fields of :class:`~stillroom.config.commands.DraftDataConfig`; the work:
:func:`stillroom.datagen.draft_data.make_draft_data`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import DraftDataConfig


def cmd_draft_data(cfg: DraftDataConfig) -> None:
    from stillroom.datagen.draft_data import make_draft_data

    make_draft_data(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "draft-data", DraftDataConfig, cmd_draft_data,
        help="generate a draft's distillation data from the target's completions",
        description="The target samples completions of chat prompts (messages up to the last user turn, rendered "
        "with its chat template) into a resumable store next to --out, exported as prompt/completion JSONL for "
        "a draft recipe (draft_forward_kl, draft_tvd_pp, draft_onpolicy). Rerun the same command to resume.",
    )
