"""Sources -> records -> held-out split -> token sequences (:class:`Example`).

:func:`build_splits` is the one entry point. In order:

1. Read every source (:mod:`stillroom.data.readers`), apply ``limit`` (counted
   in readable records) and ``on_bad_record``.
2. Encode each record (:mod:`stillroom.data.formats`).
3. Split **records** (before packing, so no document is cut across train and
   held-out): a record is held out when ``u < heldout_fraction`` where ``u`` in
   ``[0, 1)`` comes from SHA-256 of ``(source tag, record index, canonical JSON
   of the record)``. No RNG and no seed: the same data gives the same held-out
   set in every run and for every seed.
4. Build sequences. ``text`` sources with ``pack=True``: the documents of a
   source (train: in source order; held-out: in hash order) are concatenated
   (each already ends with EOS when ``add_eos``) and cut into ``seq_len``-token
   blocks; the last partial block is dropped and its tokens counted
   (``packed_tail_tokens_dropped``). Packed documents attend to the ones before
   them in the block (plain packing, EOS-separated). Everything else (text with
   ``pack=False``, prompt/completion and chat records, which are never packed)
   gives one sequence per record, truncated to the first ``seq_len`` tokens
   (counted in ``truncated_sequences`` / ``truncated_tokens``); a sequence left
   with no predicted target (e.g. a prompt longer than ``seq_len``) is dropped
   and counted in ``dropped_no_targets``.
5. Cap the held-out set at ``heldout_max`` sequences, keeping the first in hash
   order (merged over sources). Held-out records beyond the cap are **not**
   moved into training (that would make the training set depend on the cap);
   they are counted in ``heldout_sequences_over_cap``.

``Example.uid`` is ``"{tag}:{record index}:{hash}"`` for one-record sequences
and ``"{tag}:pack-{train|heldout}{block}:{hash}"`` for packed blocks, where
``hash`` is 10 hex digits of SHA-1 of the token ids: stable across runs, and it
changes when the tokens change (so a teacher store never matches stale data).
Source tags are the file stem, dataset name or bundled name (``#2``, ``#3`` ...
appended when two sources share one).

``Example.n_bytes`` is, for every kind of sequence, the UTF-8 length of the
decoded *predicted* target tokens (positions ``t >= 1`` with a target flag,
the ones :func:`stillroom.data.batch.collate` turns into targets), decoded in
maximal contiguous runs with special tokens skipped. This is what bits per byte
divides by; it can differ by a few bytes from the source text where a run
boundary splits a multi-byte character.

Stats (``DataSplits.stats``): ``records_read`` (readable + bad records),
``records_bad`` (bad records met; with ``on_bad_record=skip`` all were skipped),
``records_skipped`` (records that gave no sequence: bad + ``dropped_empty`` +
``dropped_no_targets``), ``dropped_empty`` (records with no text),
``dropped_no_targets``, ``truncated_sequences``, ``truncated_tokens``,
``packed_tail_tokens_dropped``, ``heldout_records``,
``heldout_sequences_over_cap``, ``train_sequences``, ``heldout_sequences``,
``train_tokens`` / ``heldout_tokens`` (all token ids), ``train_target_tokens`` /
``heldout_target_tokens`` (predicted targets), ``bad_record_examples`` (first
messages), ``warnings`` and ``per_source`` (the same counts per source tag,
plus its format; its held-out counts are before the ``heldout_max`` cap).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from stillroom.config.schema import DataConfig, DataSource
from stillroom.data.batch import Example
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError
from stillroom.data.formats import Encoded, Format, TextEncoder, encode_record, infer_format
from stillroom.data.readers import RawRecord, describe, read_source

_COUNTS = (
    "records_read",
    "records_bad",
    "records_skipped",
    "dropped_empty",
    "dropped_no_targets",
    "truncated_sequences",
    "truncated_tokens",
    "packed_tail_tokens_dropped",
    "heldout_records",
    "heldout_sequences_over_cap",
    "train_sequences",
    "heldout_sequences",
    "train_tokens",
    "heldout_tokens",
    "train_target_tokens",
    "heldout_target_tokens",
)


@dataclass
class DataSplits:
    """Tokenized training and held-out sequences and what happened on the way."""

    train: list[Example]
    heldout: list[Example]
    stats: dict = field(default_factory=dict)


@dataclass
class _Record:
    index: int
    key: str  # hex SHA-256 of the record's identity; also the held-out order
    enc: Encoded


def record_key(tag: str, index: int, fields: dict) -> str:
    """Hex SHA-256 of a record's identity: source tag, position and canonical content."""
    content = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(f"{tag}\x00{index}\x00{content}".encode("utf-8")).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    """True when the record with hash ``key`` falls in the held-out fraction."""
    return int(key[:16], 16) / 2.0**64 < fraction


def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode("ascii")).hexdigest()[:10]


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


class _Builder:
    def __init__(self, cfg: DataConfig, tokenizer, seed: int) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.seed = seed
        self.enc = TextEncoder(tokenizer, cfg.add_eos)
        self.stats: dict = {k: 0 for k in _COUNTS}
        self.stats.update(bad_record_examples=[], warnings=[], per_source={})

    # -------------------------------------------------------------- reading
    def read(self, src: DataSource, tag: str, counts: dict) -> tuple[Format, list[_Record]]:
        info = describe(src)
        policy = BadRecordPolicy(self.cfg.on_bad_record)
        fmt: Format | None = src.format
        records: list[_Record] = []
        for item in good_records(src, self.seed, policy, counts):
            if fmt is None:
                fmt = info.default_format or infer_format(item.fields, src, info.label, item.where)
            try:
                enc = encode_record(item.fields, fmt, src, self.enc)
            except BadRecord as bad:
                policy(bad.at(item.where))
                continue
            if enc is None:
                counts["dropped_empty"] += 1
                continue
            records.append(_Record(item.index, record_key(tag, item.index, item.fields), enc))
        counts["records_bad"] = policy.count
        self.stats["bad_record_examples"].extend(policy.examples)
        if counts["records_read"] == 0:
            raise DataError(f"data source {info.label}: no records (empty file or dataset); check data.sources[]")
        if not records:
            first = f"; first problem: {policy.examples[0]}" if policy.examples else ""
            raise DataError(
                f"data source {info.label}: none of its {counts['records_read']} records is usable "
                f"(bad: {policy.count}, empty: {counts['dropped_empty']}){first}"
            )
        assert fmt is not None
        return fmt, records

    # -------------------------------------------------------------- sequences
    def n_bytes(self, ids: list[int], target: list[bool]) -> int:
        """UTF-8 bytes of the predicted target tokens (positions >= 1), decoded in contiguous runs."""
        total, run = 0, []
        for t in range(1, len(ids) + 1):
            if t < len(ids) and target[t]:
                run.append(ids[t])
            elif run:
                text = self.tok.decode(run, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                total += len(text.encode("utf-8"))
                run = []
        return total

    def example(self, ids: list[int], target: list[bool], uid: str, src: DataSource, meta: dict) -> Example:
        return Example(
            input_ids=ids, target=target, uid=uid, domain=src.domain, n_bytes=self.n_bytes(ids, target), meta=meta
        )

    def one_per_record(
        self, records: list[_Record], tag: str, src: DataSource, fmt: Format, counts: dict
    ) -> list[tuple[str, Example]]:
        out = []
        seq_len = self.cfg.seq_len
        for r in records:
            ids, target = r.enc.input_ids, r.enc.target
            if len(ids) > seq_len:
                counts["truncated_sequences"] += 1
                counts["truncated_tokens"] += len(ids) - seq_len
                ids, target = ids[:seq_len], target[:seq_len]
            if not any(target[1:]):
                counts["dropped_no_targets"] += 1
                continue
            uid = f"{tag}:{r.index}:{_ids_hash(ids)}"
            meta = {"source": tag, "format": fmt, "record": r.index}
            out.append((r.key, self.example(list(ids), list(target), uid, src, meta)))
        return out

    def packed(
        self, records: list[_Record], tag: str, src: DataSource, split: str, counts: dict
    ) -> list[tuple[str, Example]]:
        seq_len = self.cfg.seq_len
        ids: list[int] = []
        target: list[bool] = []
        starts: list[tuple[int, _Record]] = []  # (token offset, record) where each record begins
        for r in records:
            starts.append((len(ids), r))
            ids.extend(r.enc.input_ids)
            target.extend(r.enc.target)
        n_blocks = len(ids) // seq_len
        counts["packed_tail_tokens_dropped"] += len(ids) - n_blocks * seq_len
        out = []
        k = 0  # index into starts of the record containing the block's first token
        for b in range(n_blocks):
            lo = b * seq_len
            while k + 1 < len(starts) and starts[k + 1][0] <= lo:
                k += 1
            first = starts[k][1]
            block_ids, block_target = ids[lo : lo + seq_len], target[lo : lo + seq_len]
            uid = f"{tag}:pack-{split}{b}:{_ids_hash(block_ids)}"
            meta = {"source": tag, "format": "text", "packed": True, "first_record": first.index}
            out.append((first.key, self.example(block_ids, block_target, uid, src, meta)))
        return out


def _token_counts(examples: list[Example]) -> tuple[int, int]:
    return sum(len(e.input_ids) for e in examples), sum(sum(e.target[1:]) for e in examples)


def build_splits(cfg: DataConfig, tokenizer, seed: int) -> DataSplits:
    """Read, encode, split and sequence every source of ``cfg`` (see the module docstring).

    ``tokenizer``: a Hugging Face tokenizer; ``seed`` only affects generated
    bundled sets (``instructions``, ``arithmetic``), never the held-out split.
    Raises :class:`DataError` for unusable data, naming the source.
    """
    if not cfg.sources:
        raise DataError("data.sources is empty; add at least one source (path, dataset or bundled)")
    b = _Builder(cfg, tokenizer, seed)
    train: list[Example] = []
    heldout_keyed: list[tuple[str, Example]] = []
    for src, tag in zip(cfg.sources, source_tags(cfg.sources)):
        counts = {k: 0 for k in _COUNTS}
        fmt, records = b.read(src, tag, counts)
        held = sorted((r for r in records if is_heldout(r.key, cfg.heldout_fraction)), key=lambda r: r.key)
        kept = [r for r in records if not is_heldout(r.key, cfg.heldout_fraction)]
        counts["heldout_records"] = len(held)
        if fmt == "text" and cfg.pack:
            src_train = [e for _, e in b.packed(kept, tag, src, "train", counts)]
            src_held = b.packed(held, tag, src, "heldout", counts)
        else:
            src_train = [e for _, e in b.one_per_record(kept, tag, src, fmt, counts)]
            src_held = b.one_per_record(held, tag, src, fmt, counts)
        counts["records_skipped"] = counts["records_bad"] + counts["dropped_empty"] + counts["dropped_no_targets"]
        counts["train_sequences"] = len(src_train)
        counts["heldout_sequences"] = len(src_held)  # per source: before the heldout_max cap
        counts["train_tokens"], counts["train_target_tokens"] = _token_counts(src_train)
        counts["heldout_tokens"], counts["heldout_target_tokens"] = _token_counts([e for _, e in src_held])
        train.extend(src_train)
        heldout_keyed.extend(src_held)
        b.stats["per_source"][tag] = {"format": fmt, **counts}
        for k in _COUNTS:
            b.stats[k] += counts[k]
    heldout_keyed.sort(key=lambda ke: ke[0])  # stable: blocks of one source keep their order
    over = max(0, len(heldout_keyed) - cfg.heldout_max)
    heldout = [e for _, e in heldout_keyed[: cfg.heldout_max]]
    stats = b.stats
    stats["heldout_sequences_over_cap"] = over
    stats["heldout_sequences"] = len(heldout)
    stats["train_tokens"], stats["train_target_tokens"] = _token_counts(train)
    stats["heldout_tokens"], stats["heldout_target_tokens"] = _token_counts(heldout)
    if not train:
        raise DataError(
            f"no training sequences: {stats['records_read']} records read, {stats['heldout_records']} held out, "
            f"{stats['packed_tail_tokens_dropped']} packed tokens dropped as partial blocks; "
            f"lower data.seq_len ({cfg.seq_len}) or add data"
        )
    if cfg.heldout_fraction > 0 and not heldout:
        stats["warnings"].append(
            f"no held-out sequences (heldout_fraction={cfg.heldout_fraction}, {stats['heldout_records']} records "
            "held out); evaluation has nothing to measure: raise data.heldout_fraction or add data"
        )
    return DataSplits(train=train, heldout=heldout, stats=stats)
