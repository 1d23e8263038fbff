"""Records -> token sequences: reading and encoding a source, truncation, packing and byte counts.

:class:`SequenceBuilder` is the part of :func:`stillroom.data.pipeline.build_splits`
that works on one source at a time; the pipeline's module docstring states the rules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from stillroom.config.core import DataConfig, DataSource
from stillroom.data.batch import Example
from stillroom.data.encoders import RecordEncoder, RecordViews
from stillroom.data.errors import BadRecord, BadRecordPolicy, DataError
from stillroom.data.formats import Encoded, Format, TextEncoder, infer_format
from stillroom.data.images import ImageRef
from stillroom.data.packing import fit_blocks
from stillroom.data.readers import describe
from stillroom.data.records import good_records, record_key

COUNTS = (
    "records_read",
    "records_bad",
    "records_skipped",
    "dropped_empty",
    "dropped_no_targets",
    "dropped_too_long",
    "truncated_sequences",
    "truncated_tokens",
    "packed_tail_tokens_dropped",
    "boundary_targets_excluded",
    "packed_records",
    "padding_tokens_unpacked",
    "padding_tokens_packed",
    "heldout_records",
    "heldout_sequences_over_cap",
    "steer_records",
    "train_sequences",
    "heldout_sequences",
    "train_tokens",
    "heldout_tokens",
    "train_target_tokens",
    "heldout_target_tokens",
)
"""The counters of the data statistics, per source and summed."""

View = Literal["train", "eval", "plain"]


@dataclass
class EncodedRecord:
    index: int
    key: str  # hex SHA-256 of the record's identity; also the held-out order
    views: RecordViews


def ids_hash(ids: list[int]) -> str:
    """10 hex digits of SHA-1 of the token ids: part of every uid, so a uid changes when its tokens do."""
    return hashlib.sha1(",".join(map(str, ids)).encode("ascii")).hexdigest()[:10]


class SequenceBuilder:
    """Reads, encodes and sequences the sources of ``cfg`` with ``encoder`` (see the pipeline docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer, seed: int, encoder: RecordEncoder) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.seed = seed
        self.encoder = encoder
        self.text = TextEncoder(tokenizer, cfg.add_eos)
        self.stats: dict = {k: 0 for k in COUNTS}
        self.stats.update(bad_record_examples=[], warnings=[], per_source={})

    # -------------------------------------------------------------- reading
    def read(self, src: DataSource, tag: str, counts: dict) -> tuple[Format, list[EncodedRecord]]:
        info = describe(src)
        policy = BadRecordPolicy(self.cfg.on_bad_record)
        fmt: Format | None = src.format
        records: list[EncodedRecord] = []
        for item in good_records(src, self.seed, policy, counts):
            if fmt is None:
                fmt = info.default_format or infer_format(item.fields, src, info.label, item.where)
            key = record_key(tag, item.index, item.fields)
            try:
                views = self.encoder.encode(item.fields, fmt, src, self.text, key)
            except BadRecord as bad:
                policy(bad.at(item.where))
                continue
            if views is None:
                counts["dropped_empty"] += 1
                continue
            records.append(EncodedRecord(item.index, key, views))
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

    def example(self, ids: list[int], target: list[bool], uid: str, src: DataSource, meta: dict,
                role: str | None = None, image: ImageRef | None = None, doc_lens: list[int] | None = None) -> Example:
        return Example(input_ids=ids, target=target, uid=uid, domain=src.domain, n_bytes=self.n_bytes(ids, target),
                       meta=meta, role=role, image=image, doc_lens=doc_lens)

    def sequences(self, records: list[EncodedRecord], view: View, tag: str, src: DataSource, fmt: Format,
                  split: str, counts: dict) -> list[tuple[str, Example]]:
        """``(record key, example)`` of ``view`` of ``records``: packed blocks for packable text (and, with
        ``data.attention: within_documents``, for whole packable records of other formats), else per record."""
        packs = self.cfg.pack and self.encoder.packs_text and len(self.encoder.roles) == 1
        if fmt == "text" and packs:
            return self.packed(records, view, tag, src, split, counts)
        if packs and self.cfg.attention == "within_documents":
            return self.packed_records(self.per_record(records, view, tag, src, fmt, counts), tag, fmt, split, counts)
        return self.per_record(records, view, tag, src, fmt, counts)

    def per_record(self, records: list[EncodedRecord], view: View, tag: str, src: DataSource, fmt: Format,
                   counts: dict) -> list[tuple[str, Example]]:
        """One sequence (the train view: one group) per record, each cut to ``seq_len`` (or the record dropped)."""
        out = []
        seq_len = self.cfg.seq_len
        for r in records:
            group = r.views.train if view == "train" else [getattr(r.views, view)]
            roles = self.encoder.roles if view == "train" else (None,)
            if any(len(e.input_ids) > seq_len for e in group) and self.encoder.on_too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            cut = [self._truncate(e, counts) for e in group]
            if not all(any(e.target[1:]) for e in cut):
                counts["dropped_no_targets"] += 1
                continue
            for e, role in zip(cut, roles):
                name = f"{tag}:{r.index}:{role}" if role is not None else f"{tag}:{r.index}"
                meta = {**e.meta, "source": tag, "format": fmt, "record": r.index}
                out.append((r.key, self.example(e.input_ids, e.target, f"{name}:{ids_hash(e.input_ids)}", src, meta,
                                                role, e.image)))
        return out

    def _truncate(self, e: Encoded, counts: dict) -> Encoded:
        seq_len = self.cfg.seq_len
        if len(e.input_ids) <= seq_len:
            return Encoded(list(e.input_ids), list(e.target), e.image, e.meta)
        counts["truncated_sequences"] += 1
        counts["truncated_tokens"] += len(e.input_ids) - seq_len
        return Encoded(list(e.input_ids[:seq_len]), list(e.target[:seq_len]), e.image, e.meta)

    def packed(self, records: list[EncodedRecord], view: View, tag: str, src: DataSource, split: str,
               counts: dict) -> list[tuple[str, Example]]:
        """``view`` of ``records`` concatenated in order and cut into ``seq_len`` blocks (the partial tail dropped).

        With ``data.attention: within_documents`` each block also records its documents' lengths (a document
        cut at a block edge continues as a new document of the next block) and a document's first token is
        not a target (counted in ``boundary_targets_excluded``): nothing is learned across a boundary."""
        within = self.cfg.attention == "within_documents"
        seq_len = self.cfg.seq_len
        ids: list[int] = []
        target: list[bool] = []
        starts: list[tuple[int, EncodedRecord]] = []  # (token offset, record) where each record begins
        for r in records:
            e = r.views.train[0] if view == "train" else getattr(r.views, view)
            starts.append((len(ids), r))
            ids.extend(e.input_ids)
            target.extend(e.target)
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
            doc_lens = None
            if within:
                cuts, j = [0], k + 1
                while j < len(starts) and starts[j][0] < lo + seq_len:
                    cuts.append(starts[j][0] - lo)
                    j += 1
                cuts.append(seq_len)
                doc_lens = [hi - at for at, hi in zip(cuts, cuts[1:])]
                for at in cuts[1:-1]:
                    counts["boundary_targets_excluded"] += block_target[at]
                    block_target[at] = False
            uid = f"{tag}:pack-{split}{b}:{ids_hash(block_ids)}"
            meta = {"source": tag, "format": "text", "packed": True, "first_record": first.index}
            out.append((first.key, self.example(block_ids, block_target, uid, src, meta, doc_lens=doc_lens)))
        return out

    def packed_records(self, keyed: list[tuple[str, Example]], tag: str, fmt: Format, split: str,
                       counts: dict) -> list[tuple[str, Example]]:
        """Whole per-record sequences ``keyed`` (already cut to ``seq_len``) packed into blocks of at most
        ``seq_len`` tokens by :func:`~stillroom.data.packing.fit_blocks`, each a document of its block with its
        own target flags (a later document's first flag cleared, counted in ``boundary_targets_excluded``).
        ``padding_tokens_unpacked`` / ``_packed`` count the padding to ``seq_len`` of the sequences before and
        of the blocks after. Keyed by the block's first record (its place in the held-out order)."""
        seq_len = self.cfg.seq_len
        examples = [e for _, e in keyed]
        counts["packed_records"] += len(examples)
        counts["padding_tokens_unpacked"] += sum(seq_len - len(e.input_ids) for e in examples)
        out = []
        for b, members in enumerate(fit_blocks([len(e.input_ids) for e in examples], seq_len)):
            ids: list[int] = []
            target: list[bool] = []
            for i in members:
                e = examples[i]
                counts["boundary_targets_excluded"] += bool(ids) and e.target[0]
                target.extend([False] + e.target[1:])  # flag 0 is never learned (collate), nor across a boundary
                ids.extend(e.input_ids)
            counts["padding_tokens_packed"] += seq_len - len(ids)
            records = [examples[i].meta["record"] for i in members]
            meta = {"source": tag, "format": fmt, "packed": True, "records": records}
            out.append((keyed[members[0]][0], Example(
                input_ids=ids, target=target, uid=f"{tag}:pack-{split}{b}:{ids_hash(ids)}",
                domain=examples[members[0]].domain, n_bytes=sum(examples[i].n_bytes for i in members), meta=meta,
                doc_lens=[len(examples[i].input_ids) for i in members])))
        return out


def token_counts(examples: list[Example]) -> tuple[int, int]:
    """``(all token ids, predicted target tokens)`` of ``examples``."""
    return sum(len(e.input_ids) for e in examples), sum(sum(e.target[1:]) for e in examples)
