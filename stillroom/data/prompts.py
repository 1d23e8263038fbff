"""Prompts from data records: the first ``n`` records of ``bundled:NAME`` or a file, cut to their prompt.

One reader for every command that feeds prompts to a model (``spec-eval``, ``draft-data``):

* :func:`prompt_of` cuts one record: chat ``messages`` up to the last user turn (trailing assistant
  turns dropped), else ``prompt``, else the first :data:`TEXT_PROMPT_WORDS` words of ``text``
  (``kinds`` narrows which of the three a command accepts);
* :func:`read_prompts` reads the records through the data pipeline's rules
  (:func:`good_records`: ``limit`` counts readable records; a bad record stops with ``file:line``
  or is skipped and counted) and cuts each with :func:`prompt_of`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stillroom.config.core import DataSource
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError

from stillroom.data.records import good_records

TEXT_PROMPT_WORDS = 48  # plain-text records are cut to their first words to make a prompt
PROMPT_KINDS = ("messages", "prompt", "text")

Prompt = str | list[dict]


def prompt_ids(tokenizer, prompt: Prompt, where: str = "prompt") -> list[int]:
    """Token ids of one prompt: plain text (with the tokenizer's own special tokens), or chat messages
    rendered with the tokenizer's chat template plus the generation prompt (the template adds whatever
    special tokens it wants). An empty encoding falls back to BOS; without BOS it is an error."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{where} is a list of chat messages but the tokenizer has no chat_template; "
                             "pass plain-text prompts or use a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError(f"{where}: expected a string or a list of {{'role', 'content'}} dicts, "
                        f"got {type(prompt).__name__}")
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(f"{where} tokenizes to no tokens and the tokenizer has no BOS token")
        ids = [bos]
    return list(ids)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``id`` (the record's ``id`` field, else its position), ``prompt`` (text or chat messages
    ending in a user turn) and ``where`` (``file:line``)."""

    id: str
    prompt: Prompt
    where: str


def data_source(data: str, limit: int | None = None) -> DataSource:
    """``bundled:NAME`` or a path -> :class:`DataSource` (reading at most ``limit`` readable records)."""
    if data.startswith("bundled:"):
        return DataSource(bundled=data.split(":", 1)[1], limit=limit)
    return DataSource(path=data, limit=limit)


def prompt_of(fields: dict, where: str, *, kinds: Sequence[str] = PROMPT_KINDS) -> Prompt:
    """The prompt part of a record: chat messages up to the last user turn, ``prompt``, or the start of ``text``."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: a prompt record must be an object (got {type(fields).__name__})")
    messages = fields.get("messages")
    if "messages" in kinds and isinstance(messages, list):
        messages = list(messages)
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages.pop()
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise ValueError(f"{where}: `messages` has no user turn to use as a prompt")
        return messages
    if "prompt" in kinds and isinstance(fields.get("prompt"), str):
        return fields["prompt"]
    if "text" in kinds and isinstance(fields.get("text"), str):
        return " ".join(fields["text"].split()[:TEXT_PROMPT_WORDS])
    wanted = ", ".join(f"`{k}`" for k in kinds[:-1]) + (" or " if len(kinds) > 1 else "") + f"`{kinds[-1]}`"
    raise ValueError(f"{where}: a prompt record needs a {wanted} field (has {sorted(fields)})")


def read_prompts(
    data: str,
    n: int,
    *,
    seed: int = 0,
    kinds: Sequence[str] = PROMPT_KINDS,
    on_bad_record: Literal["stop", "skip"] = "stop",
    counts: dict | None = None,
) -> list[PromptRecord]:
    """The prompts of the first ``n`` readable records of ``data`` (``bundled:NAME`` or a
    .jsonl/.json/.parquet/.txt file); ``seed`` seeds bundled generators.

    A record that cannot be read (invalid JSON ...) stops with its location, or with
    ``on_bad_record="skip"`` is skipped and counted in ``counts["records_bad"]``; a readable
    record without a usable prompt always stops (ValueError naming it). ``counts`` (a dict), when
    given, also receives ``records_read``.
    """
    policy = BadRecordPolicy(on_bad_record)

    def on_bad(bad: BadRecord) -> None:
        if on_bad_record == "stop":
            raise DataError(f"{bad.where}: {bad.reason}; fix the record or skip bad records (on_bad_record=skip)")
        policy(bad)

    tally: dict = {}
    prompts = [
        PromptRecord(str(rec.fields.get("id", rec.index)), prompt_of(rec.fields, rec.where, kinds=kinds), rec.where)
        for rec in good_records(data_source(data, limit=n), seed, on_bad, tally)
    ]
    if counts is not None:
        counts.update(records_read=tally.get("records_read", 0), records_bad=policy.count)
    if not prompts:
        raise DataError(f"{data}: no records to use as prompts")
    return prompts
