"""MEND's records: what one record becomes (a full-context sequence ``[D ; x]`` and its demonstration length).

Stage ``finetune`` reads ``{demonstrations: [K strings], prompt: query, completion: answer}`` JSONL records
(format ``prompt_completion``; the field names are ``mend.demos_field`` and the source's ``prompt_field`` /
``completion_field``): ``D = BOS? + demo_1 + sep + ... + demo_K + sep``, ``x = query + answer + EOS``, targets the
answer and EOS. Stage ``pretrain`` reads plain text (format ``text``): its first ``pretrain_split`` of tokens are
D, the rest x, every x token after the first a target. A malformed record is a :class:`BadRecord` (the pipeline
names its ``file:line``); a source of the wrong format a :class:`DataError`.
"""

from __future__ import annotations

from typing import Literal

from stillroom.config.core import DataSource
from stillroom.data.batch import Batch
from stillroom.data.encoders import RecordViews
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.formats import Encoded, Format, TextEncoder, string_field

DEMO_LEN = "mend_demo_len"
"""``Example.meta`` key: tokens of the demonstration part D at the start of the sequence."""


class MendEncoder:
    """A record -> one full-context sequence ``[D ; x]`` with its demonstration length in ``meta`` (targets: the
    answer and EOS in stage finetune, every x token after the first in stage pretrain)."""

    roles: tuple[str | None, ...] = (None,)
    on_too_long: Literal["truncate", "drop"] = "drop"
    packs_text = False
    views_differ = False

    def __init__(self, stage: str, demos_field: str, separator: str, split: float) -> None:
        self.stage, self.demos_field, self.separator, self.split = stage, demos_field, separator, split
        self.counts: dict[str, int] = {}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        enc = self._pretrain(fields, fmt, src, text) if self.stage == "pretrain" else \
            self._finetune(fields, fmt, src, text)
        return None if enc is None else RecordViews([enc], enc, enc)

    def _pretrain(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder) -> Encoded | None:
        if fmt != "text":
            raise DataError(f"mend.stage=pretrain splits plain text into demonstrations and input, but a data "
                            f"source has format {fmt!r}; give text records (format: text)")
        ids = text.bos_prefix + text.encode(string_field(fields, src.text_field, "set the source's text_field")) \
            + text.eos()
        if len(ids) < 3:
            return None
        d = min(max(1, round(self.split * len(ids))), len(ids) - 2)
        return Encoded(ids, [False] * (d + 1) + [True] * (len(ids) - d - 1), meta={DEMO_LEN: d})

    def _finetune(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder) -> Encoded:
        if fmt != "prompt_completion":
            raise DataError(f"mend.stage=finetune reads {{{self.demos_field}, {src.prompt_field}, "
                            f"{src.completion_field}}} records, but a data source has format {fmt!r}; set its "
                            "format: prompt_completion")
        demos = fields.get(self.demos_field)
        if not isinstance(demos, list) or not demos or not all(isinstance(d, str) and d for d in demos):
            raise BadRecord(f"field {self.demos_field!r} must be a non-empty list of non-empty demonstration "
                            f"strings (got {demos!r:.80}); set mend.demos_field")
        d_ids = text.bos_prefix + text.encode(self.separator.join(demos) + self.separator)
        query = text.encode(string_field(fields, src.prompt_field, "set the source's prompt_field"))
        answer = text.encode(string_field(fields, src.completion_field, "set the source's completion_field"))
        if not query or not answer:
            raise BadRecord(f"the query ({src.prompt_field!r}) and the answer ({src.completion_field!r}) must both "
                            "be non-empty: MEND compares the LLM's outputs on the query's tokens")
        answer = answer + text.eos()
        ids = d_ids + query + answer
        return Encoded(ids, [False] * (len(d_ids) + len(query)) + [True] * len(answer), meta={DEMO_LEN: len(d_ids)})


def encoder(cfg) -> MendEncoder:
    mc = cfg.mend
    return MendEncoder(mc.stage, mc.demos_field, mc.demo_separator, mc.pretrain_split)


def demo_lengths(batch: Batch, demo_lens: dict[str, int]) -> list[int]:
    """Per row of ``batch``: its demonstration length (every MEND sequence has one)."""
    missing = [u for u in batch.uids if u not in demo_lens]
    if missing:
        raise ValueError(f"mend: no demonstration split for the sequences {missing[:3]}; MEND trains only on the "
                         "sequences of its own encoder")
    return [demo_lens[u] for u in batch.uids]
