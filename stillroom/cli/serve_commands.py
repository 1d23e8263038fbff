"""``stillroom serve-teacher MODEL``: serve a local teacher over an OpenAI-compatible HTTP API.

Flags: the fields of :class:`~stillroom.config.commands.ServeTeacherConfig`; the work:
:func:`stillroom.run.serve.serve_teacher`.
"""

from __future__ import annotations

from stillroom.cli.sections import section_command
from stillroom.config.commands import ServeTeacherConfig


def cmd_serve_teacher(cfg: ServeTeacherConfig) -> None:
    from stillroom.run.serve import serve_teacher

    serve_teacher(cfg)


def register(subparsers) -> None:
    section_command(
        subparsers, "serve-teacher", ServeTeacherConfig, cmd_serve_teacher, positional=("model",),
        help="serve a local teacher over an OpenAI-compatible API (prompt log-probs for logit KD, generations)",
        description="Serve MODEL (a Hugging Face folder, a .gguf file, or builtin:smollm2-135m-instruct) with "
        "/v1/completions (vLLM-style prompt_logprobs), /v1/chat/completions, /v1/models and /health. "
        "Binds to loopback unless --host says otherwise. Train against it with teacher.source=remote.",
    )
