"""Errors of the data pipeline and the bad-record policy.

A :class:`BadRecord` is one record that cannot be used (invalid JSON, missing
field, wrong type, a chat template that breaks the prefix property ...). It
carries *where* (``file:line``, ``file[row 3]``, ``dataset[12]``) and *why*.
:class:`BadRecordPolicy` applies ``data.on_bad_record``: ``stop`` turns the
first bad record into a :class:`DataError` that names it and says how to fix
it; ``skip`` counts it (nothing is dropped silently) and keeps the first few
messages for the run report.
"""

from __future__ import annotations

from typing import Literal


class DataError(ValueError):
    """Data that cannot be used; the message names the source and how to fix it."""


class BadRecord(Exception):
    """One unusable record. ``where`` may be filled in later by the caller."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where

    def at(self, where: str) -> "BadRecord":
        """The same bad record, located at ``where``."""
        return BadRecord(self.reason, where)


class BadRecordPolicy:
    """Applies ``data.on_bad_record`` and counts what it skips.

    ``count``: bad records seen; ``examples``: the first ``keep`` messages.
    """

    def __init__(self, policy: Literal["stop", "skip"], keep: int = 20) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_bad_record must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.keep = keep
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, bad: BadRecord) -> None:
        """Raise (stop) or record (skip) ``bad``."""
        if self.policy == "stop":
            fix = "fix the line" if _looks_like_line(bad.where) else "fix the record"
            raise DataError(f"{bad.where}: {bad.reason}; {fix} or set data.on_bad_record=skip")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{bad.where}: {bad.reason}")


def _looks_like_line(where: str) -> bool:
    tail = where.rsplit(":", 1)[-1]
    return tail.isdigit()
