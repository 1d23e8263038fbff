"""``stillroom spec-eval``: acceptance rate, block efficiency and speed-up of a draft for a target.

Flags: the fields of :class:`~stillroom.config.commands.SpecEvalConfig`; the work:
:func:`stillroom.run.spec_eval.spec_eval`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import SpecEvalConfig


def cmd_spec_eval(cfg: SpecEvalConfig) -> None:
    from stillroom.run.spec_eval import spec_eval

    spec_eval(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "spec-eval", SpecEvalConfig, cmd_spec_eval,
        help="measure a draft model for speculative decoding of a target",
        description="Speculative decoding with --draft proposing for --target: acceptance rate, block "
        "efficiency (measured and DistillSpec's estimate), memory-bound and measured speed-up. Writes "
        "report.json, report.md and block_efficiency.png into --out (default: runs/spec-eval/<draft>-vs-<target>).",
    )
