"""``stillroom merge A B --t 0.5 --out DIR``: SLERP two models of the same architecture, tensor by tensor.

Flags: the fields of :class:`~stillroom.config.commands.MergeConfig`; the work:
:func:`stillroom.compress.merge.merge`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import MergeConfig


def cmd_merge(cfg: MergeConfig) -> None:
    from stillroom.compress.merge import merge

    merge(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "merge", MergeConfig, cmd_merge, positional=("a", "b"),
        help="SLERP-merge two models of the same architecture (self-data distillation step 3)",
        description="Spherical linear interpolation of every floating tensor of two Hugging Face model folders "
        "(safetensors) of the same architecture: SLERP(A, B; t) = [sin((1-t)W) A + sin(tW) B] / sin W with "
        "W the angle between the flattened tensors; linear interpolation where sin W ~ 0. t=0 gives A, t=1 gives B. "
        "Writes safetensors plus A's config and tokenizer into --out (built in a temporary folder, then renamed).",
    )
