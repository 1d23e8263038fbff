"""Sources -> records -> held-out split -> token sequences (:class:`Example`): the one data pipeline.

:func:`build_splits` is the one entry point, for every method and every record
encoder (:mod:`stillroom.data.encoders`). In order:

1. Read every source (:mod:`stillroom.data.readers`), apply ``limit`` (counted
   in readable records) and ``on_bad_record``.
2. Encode each record into its views (train group, eval, plain) with the
   method's encoder (default :class:`~stillroom.data.encoders.PlainEncoder`:
   the record formats of :mod:`stillroom.data.formats`).
3. Split **records** (before packing, so no document is cut across train and
   held-out): a record is held out when ``u < heldout_fraction`` where ``u`` in
   ``[0, 1)`` comes from SHA-256 of ``(source tag, record index, canonical JSON
   of the record)``. No RNG and no seed: the same data gives the same held-out
   set in every run and for every seed. With ``steer_fraction > 0`` (a method
   that steers itself on data, DDK) the records with
   ``heldout_fraction <= u < heldout_fraction + steer_fraction`` form the
   ``steer`` split: neither trained on nor reported.
4. Build sequences. ``text`` sources with ``pack=True``: the documents of a
   source (train: in source order; held-out: in hash order) are concatenated
   (each already ends with EOS when ``add_eos``) and cut into ``seq_len``-token
   blocks; the last partial block is dropped and its tokens counted
   (``packed_tail_tokens_dropped``). With ``attention=across_documents`` packed
   documents attend to the ones before them in the block (plain packing,
   EOS-separated). With ``attention=within_documents`` each attends only to
   itself (``Example.doc_lens``; :mod:`stillroom.data.packing`), its first token
   is not a target (``boundary_targets_excluded``), and prompt/completion and chat
   records are cut as below and then packed whole into blocks of at most
   ``seq_len`` tokens (``packed_records``; padding to ``seq_len`` before and after
   in ``padding_tokens_unpacked`` / ``padding_tokens_packed`` and the fractions
   ``padding_fraction_unpacked`` / ``padding_fraction_packed``). Everything else
   (text with ``pack=False``, prompt/completion and chat records when not packed)
   gives one sequence per record (a group of sequences for grouped encoders,
   laid out consecutively), truncated to the first ``seq_len`` tokens
   (counted in ``truncated_sequences`` / ``truncated_tokens``; an encoder with
   ``on_too_long="drop"`` drops the record instead, counted in
   ``dropped_too_long``); a record left with a sequence without a predicted
   target (e.g. a prompt longer than ``seq_len``) is dropped and counted in
   ``dropped_no_targets``.
5. Cap the held-out set at ``heldout_max`` sequences, keeping the first in hash
   order (merged over sources). Held-out records beyond the cap are **not**
   moved into training (that would make the training set depend on the cap);
   they are counted in ``heldout_sequences_over_cap``. With ``train_max``, cap the
   training set the same way (counted in ``train_sequences_over_cap``): a small set
   for several epochs.

``Example.uid`` is ``"{tag}:{record index}:{hash}"`` for one-record sequences
(``"{tag}:{record index}:{role}:{hash}"`` in a group) and
``"{tag}:pack-{train|heldout|...}{block}:{hash}"`` for packed blocks, where
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
``packed_tail_tokens_dropped``, ``boundary_targets_excluded``, ``packed_records``,
``padding_tokens_unpacked``, ``padding_tokens_packed`` (step 4), ``heldout_records``,
``heldout_sequences_over_cap``, ``steer_records``, ``dropped_too_long``,
``train_sequences``, ``heldout_sequences``,
``train_tokens`` / ``heldout_tokens`` (all token ids), ``train_target_tokens`` /
``heldout_target_tokens`` (predicted targets), ``bad_record_examples`` (first
messages, ``file:line: why``; :func:`bad_record_lines` shows them),
``warnings`` and ``per_source`` (the same counts per source tag,
plus its format; its held-out counts are before the ``heldout_max`` cap),
and the encoder's own counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from stillroom.config.core import DataConfig
from stillroom.data.batch import Example
from stillroom.data.encoders import PlainEncoder, RecordEncoder
from stillroom.data.errors import DataError
from stillroom.data.records import source_tags, split_position
from stillroom.data.sequences import COUNTS, SequenceBuilder, token_counts

@dataclass
class DataSplits:
    """Tokenized sequences of every split and what happened on the way.

    ``train`` holds the method's training view, in groups of ``group_size`` consecutive
    sequences; ``heldout`` the eval view of the held-out records (what the report and
    ``train.eval_every`` measure); ``plain_train`` / ``plain_heldout`` the plain view (what the
    CE baseline trains and is measured on) when the encoder's views differ, else ``None``
    (use :attr:`baseline_train` / :attr:`baseline_heldout`); ``steer`` the eval view of the
    steer records (empty unless asked).
    """

    train: list[Example]
    heldout: list[Example]
    stats: dict = field(default_factory=dict)
    plain_train: list[Example] | None = None
    plain_heldout: list[Example] | None = None
    steer: list[Example] = field(default_factory=list)
    group_size: int = 1

    @property
    def baseline_train(self) -> list[Example]:
        return self.train if self.plain_train is None else self.plain_train

    @property
    def baseline_heldout(self) -> list[Example]:
        return self.heldout if self.plain_heldout is None else self.plain_heldout


def build_splits(cfg: DataConfig, tokenizer, seed: int, encoder: RecordEncoder | None = None, *,
                 steer_fraction: float = 0.0, log: Callable[[str], None] | None = None) -> DataSplits:
    """Read, encode, split and sequence every source of ``cfg`` (see the module docstring).

    ``tokenizer``: a Hugging Face tokenizer; ``seed`` only affects generated bundled sets
    (``instructions``, ``arithmetic``), never the held-out split; ``encoder``: what a record
    becomes (default :class:`PlainEncoder`); ``steer_fraction``: records set apart for a
    method that steers on data; ``log``: where the skipped bad records are shown as they are read
    (:func:`bad_record_lines`). Raises :class:`DataError` for unusable data, naming the source.
    """
    if not cfg.sources:
        raise DataError("data.sources is empty; add at least one source (path, dataset or bundled)")
    if not 0.0 <= steer_fraction < 1.0 - cfg.heldout_fraction:
        raise DataError(f"a steer split of {steer_fraction} next to data.heldout_fraction={cfg.heldout_fraction} "
                        "leaves no training data; lower one of them")
    encoder = encoder or PlainEncoder()
    b = SequenceBuilder(cfg, tokenizer, seed, encoder)
    lists: dict[str, list] = {"train": [], "heldout": [], "plain_train": [], "plain_heldout": [], "steer": []}
    for src, tag in zip(cfg.sources, source_tags(cfg.sources)):
        counts = {k: 0 for k in COUNTS}
        fmt, records = b.read(src, tag, counts)
        by_key = sorted(records, key=lambda r: r.key)
        held = [r for r in by_key if split_position(r.key) < cfg.heldout_fraction]
        steer = [r for r in by_key if cfg.heldout_fraction <= split_position(r.key) < cfg.heldout_fraction + steer_fraction]
        kept = [r for r in records if split_position(r.key) >= cfg.heldout_fraction + steer_fraction]
        counts["heldout_records"], counts["steer_records"] = len(held), len(steer)
        keyed_train = b.sequences(kept, "train", tag, src, fmt, "train", counts)
        src_train = [e for _, e in keyed_train]
        src_held = b.sequences(held, "eval", tag, src, fmt, "heldout", counts)
        scratch = {k: 0 for k in COUNTS}  # the other views are not counted twice
        lists["steer"] += [e for _, e in b.sequences(steer, "eval", tag, src, fmt, "steer", scratch)]
        if encoder.views_differ:
            lists["plain_train"] += [e for _, e in b.sequences(kept, "plain", tag, src, fmt, "plain-train", scratch)]
            lists["plain_heldout"] += b.sequences(held, "plain", tag, src, fmt, "plain-heldout", scratch)
        counts["records_skipped"] = (counts["records_bad"] + counts["dropped_empty"] + counts["dropped_no_targets"]
                                     + counts["dropped_too_long"])
        counts["train_sequences"] = len(src_train)
        counts["heldout_sequences"] = len(src_held)  # per source: before the heldout_max cap
        counts["train_tokens"], counts["train_target_tokens"] = token_counts(src_train)
        counts["heldout_tokens"], counts["heldout_target_tokens"] = token_counts([e for _, e in src_held])
        lists["train"] += keyed_train
        lists["heldout"] += src_held
        b.stats["per_source"][tag] = {"format": fmt, **counts}
        for k in COUNTS:
            b.stats[k] += counts[k]
    b.stats.update(encoder.counts)
    heldout = _capped(lists["heldout"], cfg.heldout_max)
    train = _train_capped(lists["train"], cfg.train_max, encoder)
    stats = b.stats
    stats["train_sequences_over_cap"] = len(lists["train"]) - len(train)
    stats["train_sequences"] = len(train)
    stats["heldout_sequences_over_cap"] = max(0, len(lists["heldout"]) - cfg.heldout_max)
    stats["heldout_sequences"] = len(heldout)
    stats["train_tokens"], stats["train_target_tokens"] = token_counts(train)
    stats["heldout_tokens"], stats["heldout_target_tokens"] = token_counts(heldout)
    if stats["packed_records"]:  # padding to seq_len of the packed records, one per row vs packed in blocks
        tokens = stats["packed_records"] * cfg.seq_len - stats["padding_tokens_unpacked"]
        for when in ("unpacked", "packed"):
            pad = stats[f"padding_tokens_{when}"]
            stats[f"padding_fraction_{when}"] = round(pad / (pad + tokens), 4)
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
    for line in bad_record_lines(stats) if log is not None else ():
        log(line)
    differ = encoder.views_differ
    return DataSplits(train=train, heldout=heldout, stats=stats, group_size=len(encoder.roles), steer=lists["steer"],
                      plain_train=lists["plain_train"] if differ else None,
                      plain_heldout=_capped(lists["plain_heldout"], cfg.heldout_max) if differ else None)


def _train_capped(keyed: list[tuple[str, Example]], cap: int | None, encoder: RecordEncoder) -> list[Example]:
    """Every training sequence in source order, or with ``data.train_max`` the first ``cap`` in record-hash order
    (a spread over the sources' records, the same whatever the seed): a small set that several epochs repeat."""
    if cap is None:
        return [e for _, e in keyed]
    if len(encoder.roles) > 1 or encoder.views_differ:
        raise DataError(f"data.train_max={cap} keeps single sequences, but this method's records become groups or "
                        "two views of each sequence; remove data.train_max (or limit the records with "
                        "data.sources[].limit)")
    return _capped(keyed, cap)


def _capped(keyed: list[tuple[str, Example]], cap: int) -> list[Example]:
    """The first ``cap`` examples in record-hash order (stable: blocks of one source keep their order)."""
    return [e for _, e in sorted(keyed, key=lambda ke: ke[0])[:cap]]


def bad_record_lines(stats: dict, shown: int = 5) -> list[str]:
    """What the console shows of the bad records ``data.on_bad_record: skip`` skipped: their count, then the
    first ``shown`` as ``file:line: why`` (report.md lists up to 20); no lines when there were none."""
    count, examples = stats.get("records_bad", 0), stats.get("bad_record_examples", [])[:shown]
    if not count:
        return []
    lines = [f"data: {count} bad record(s) skipped (data.on_bad_record=skip); fix them or drop them from the "
             f"source{', the first:' if examples else ''}"]
    lines += [f"  {e}" for e in examples]
    if count > len(examples):
        lines.append(f"  ... and {count - len(examples)} more (report.md lists the first {min(count, 20)})")
    return lines
