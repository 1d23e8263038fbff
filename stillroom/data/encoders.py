"""Record encoders: what one record becomes, the seam where a method shapes its data.

The data pipeline (:mod:`stillroom.data.pipeline`) owns everything records have in
common: reading, the bad-record policy, the held-out split, truncation, packing,
byte counts and statistics. An encoder decides only what token sequences one
record gives, as three views (:class:`RecordViews`):

* ``train``: the method's training sequences, a group of ``len(roles)`` sequences
  drawn together into one micro-batch (step-by-step's predict and explain tasks,
  REDI's chosen and rejected traces, or just one sequence);
* ``eval``: the sequence the trained student is measured on (held-out records);
* ``plain``: the standard fine-tuning sequence, on which the cross-entropy
  baseline (``baseline: true``) trains and is measured.

:class:`PlainEncoder` (every method without data of its own) gives one sequence
for all three views. The method encoders live with their methods in
:mod:`stillroom.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from stillroom.config.core import DataSource
from stillroom.data.formats import Encoded, Format, TextEncoder, encode_record


@dataclass
class RecordViews:
    """The sequences one record gives (token ids + target flags, before truncation and packing)."""

    train: list[Encoded]
    """The training group, one sequence per role of the encoder."""
    eval: Encoded
    """What the trained student is measured on when the record is held out."""
    plain: Encoded
    """The standard fine-tuning sequence: the CE baseline's training and evaluation data."""


class RecordEncoder(Protocol):
    roles: tuple[str | None, ...]
    """One role per training sequence of a record (``(None,)``: one unnamed sequence)."""
    on_too_long: Literal["truncate", "drop"]
    """A group with a sequence longer than ``data.seq_len``: cut each sequence, or drop the record
    (counted as ``dropped_too_long``; for objectives that normalise by the sequence length)."""
    packs_text: bool
    """Text records may be packed into ``seq_len`` blocks (``data.pack``); groups are never packed."""
    views_differ: bool
    """False when every record's train, eval and plain views are the same single sequence."""
    counts: dict[str, int]
    """Encoder-specific counters merged into the data statistics (e.g. ``dropped_empty_label``)."""

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        """The views of one record, ``None`` when it has no content (``dropped_empty``).

        ``key``: the record's identity hash (:func:`stillroom.data.records.record_key`), for draws
        that must be the same for a record in every run.

        Raise :class:`stillroom.data.errors.BadRecord` for a record that cannot be used (the
        pipeline applies ``data.on_bad_record``) and :class:`stillroom.data.errors.DataError` for
        a source that cannot be (a wrong format)."""
        ...


class PlainEncoder:
    """The record formats as they are (:func:`stillroom.data.formats.encode_record`): one sequence per record."""

    roles: tuple[str | None, ...] = (None,)
    on_too_long: Literal["truncate", "drop"] = "truncate"
    packs_text = True
    views_differ = False

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def encode(self, fields: dict, fmt: Format, src: DataSource, text: TextEncoder, key: str) -> RecordViews | None:
        enc = encode_record(fields, fmt, src, text)
        return None if enc is None else RecordViews([enc], enc, enc)
