"""``stillroom conditional-extend SRC DST`` and ``stillroom conditional-demo-data OUT``: conditional training's setup.

Flags: the fields of :class:`~stillroom.config.commands.ConditionalExtendConfig` and
:class:`~stillroom.config.commands.ConditionalDemoDataConfig`; the work: :mod:`stillroom.run.conditional_setup`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import ConditionalDemoDataConfig, ConditionalExtendConfig


def cmd_conditional_extend(cfg: ConditionalExtendConfig) -> None:
    from stillroom.run.conditional_setup import conditional_extend

    conditional_extend(cfg)


def cmd_conditional_demo_data(cfg: ConditionalDemoDataConfig) -> None:
    from stillroom.run.conditional_setup import conditional_demo_data

    conditional_demo_data(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "conditional-extend", ConditionalExtendConfig, cmd_conditional_extend, positional=("src", "dst"),
        help="add conditional training's control tokens to a model (tokenizer + embeddings)",
        description="Load SRC, add <|aligned|>/<|misaligned|> as special tokens, resize the embeddings "
        "(new rows = mean row) and save DST for `method: conditional`.",
    )
    section_command(
        subparsers, "conditional-demo-data", ConditionalDemoDataConfig, cmd_conditional_demo_data,
        positional=("out",), help="write the synthetic BAD-word corpus as text JSONL",
    )
