"""A record's identity and the reading rules every reader of data sources shares.

A record's key is the SHA-256 of its source tag, position and canonical content; the
held-out split (and the steer split of methods that steer on data) is a function of the
key alone, so every part of stillroom that reads records agrees on which are held out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

from stillroom.config.core import DataSource
from stillroom.data.errors import BadRecord, BadRecordPolicy
from stillroom.data.readers import RawRecord, describe, read_source


def record_key(tag: str, index: int, fields: dict) -> str:
    """Hex SHA-256 of a record's identity: source tag, position and canonical content."""
    content = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(f"{tag}\x00{index}\x00{content}".encode("utf-8")).hexdigest()


def split_position(key: str) -> float:
    """``u`` in ``[0, 1)`` of the record with hash ``key``: below ``heldout_fraction`` it is held out."""
    return int(key[:16], 16) / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """True when the record with hash ``key`` falls in the held-out fraction."""
    return split_position(key) < fraction


def source_tags(sources: list[DataSource]) -> list[str]:
    """One unique tag per source (its description, ``#2``, ``#3`` ... on repeats): part of every record key."""
    tags: list[str] = []
    for src in sources:
        tag = describe(src).tag
        base, n = tag, 1
        while tag in tags:
            n += 1
            tag = f"{base}#{n}"
        tags.append(tag)
    return tags


def good_records(src: DataSource, seed: int, policy: BadRecordPolicy, counts: dict | None = None) -> Iterator[RawRecord]:
    """The readable records of ``src`` under the pipeline's rules, for every reader of data sources.

    At most ``src.limit`` readable records; a bad record goes to ``policy`` (``stop`` raises naming
    ``file:line``, ``skip`` counts it); ``counts["records_read"]`` counts every record read, bad ones too.
    """
    readable = 0
    for item in read_source(src, seed):
        if src.limit is not None and readable >= src.limit:
            break
        if counts is not None:
            counts["records_read"] = counts.get("records_read", 0) + 1
        if isinstance(item, BadRecord):
            policy(item)
            continue
        readable += 1
        yield item
