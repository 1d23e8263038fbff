"""Text records for the ``mlm`` domain: pydoc prose or a JSONL file, a hash split, tokenized sequences, batches.

Records are ``(uid, text, label)``. ``pydoc`` reads Python's own ``pydoc_data.topics`` (the reference
manual's sections, e.g. ``compound``, ``specialnames``), one record per paragraph (blank-line separated, at
least ``min_words`` words): documentation prose, unlike the web/QA text MiniLM was pre-trained on. Its labels
are the ``classes`` topics with the most paragraphs (the largest classes, so every class has enough
held-out paragraphs; the topics differ in subject and vocabulary, so a probe can learn them); every other
paragraph is unlabelled (``label = None``) and only trains the MLM. A ``.jsonl`` file gives ``text`` and
an optional string ``label``; a line that is not a JSON object with a string ``text`` is refused, naming
the file and line.

The held-out set is chosen by a SHA-256 hash of the text (not its position or topic), so a paragraph that
appears twice lands on one side, and the split does not move when other records are added. Labels are
read only by the probe and the fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class TextExample:
    """One tokenized record: ``input_ids`` ``[T]`` (int64, [CLS] .. [SEP], ``T <= seq_len``), ``label`` the class
    index or ``-1`` when unlabelled."""

    uid: str
    text: str
    input_ids: torch.Tensor
    label: int = -1


@dataclass
class TextBatch:
    """A micro-batch of sequences: ``input_ids`` / ``attention_mask`` ``[B, T]`` (right-padded), ``labels`` ``[B]``
    (class or -1; read only by the probe and the fine-tuning), ``uids``. One target per sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    uids: list[str]
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        """``B``: the MLM loss is a per-sequence mean, summed (:func:`~.mlm.mlm_loss`)."""
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "TextBatch":
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.uids,
                         self.target_weight)


def collate_text(examples: list[TextExample], pad_id: int = 0) -> TextBatch:
    """Right-pad the examples' ids with ``pad_id`` to the longest in the batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = e.input_ids
        mask[i, :len(e.input_ids)] = 1
    return TextBatch(ids, mask, torch.tensor([e.label for e in examples], dtype=torch.long), [e.uid for e in examples])


def pydoc_records(classes: int, min_words: int) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """``(records (uid, text, topic or None), the labelled topics in class order)`` from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    paragraphs = {name: [p.strip() for p in body.split("\n\n") if len(p.split()) >= min_words]
                  for name, body in sorted(topics.items())}
    sizes = Counter({name: len(ps) for name, ps in paragraphs.items()})
    labelled = [name for name, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:classes]]
    records = [(f"pydoc:{name}:{i}", " ".join(p.split()), name if name in labelled else None)
               for name, ps in paragraphs.items() for i, p in enumerate(ps)]
    return records, labelled


def jsonl_records(path: str, min_words: int) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """``(records, the labels sorted)`` from a JSONL file (see the module docstring)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"mlm.dataset={path}: no such file; give `pydoc` or a .jsonl file of "
                                '{"text": ..., "label": ...} lines')
    records = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"mlm.dataset={path} line {n}: not JSON ({err.msg}); each line must be an object with a "
                             '"text" string, e.g. {"text": "...", "label": "topic"}') from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"mlm.dataset={path} line {n}: no \"text\" string; each line must be an object with a "
                             '"text" string, e.g. {"text": "...", "label": "topic"}')
        label = row.get("label")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"mlm.dataset={path} line {n}: \"label\" must be a string or absent, got {label!r}")
        if len(row["text"].split()) >= min_words:
            records.append((f"jsonl:{n}", " ".join(row["text"].split()), label))
    labels = sorted({r[2] for r in records if r[2] is not None})
    return records, labels


def is_heldout(text: str, fraction: float) -> bool:
    """Whether ``text`` is held out: the first 8 bytes of its SHA-256, as a fraction of 2^64, below ``fraction``."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return h / 2 ** 64 < fraction


@dataclass
class TextSplits:
    """The tokenized records: ``train`` (all training texts: the MLM's data) and ``heldout``; ``classes`` (label
    names, index = class)."""

    source: str
    train: list[TextExample]
    heldout: list[TextExample]
    classes: list[str]
    stats: dict = field(default_factory=dict)

    @property
    def baseline_train(self) -> list[TextExample]:
        return self.train

    @property
    def baseline_heldout(self) -> list[TextExample]:
        return self.heldout

    def labelled(self, which: str) -> list[TextExample]:
        return [e for e in getattr(self, which) if e.label >= 0]

    def notes(self) -> list[str]:
        s = self.stats
        return [f"data: {self.source}: {s['train']} training / {s['heldout']} held-out texts (hash split), "
                f"{s['train_labelled']} / {s['heldout_labelled']} of them labelled in {len(self.classes)} classes "
                f"({', '.join(self.classes)}; labels: probe and fine-tuning only); {s['truncated']} truncated to "
                f"{s['seq_len']} tokens"]


def build_text_splits(dataset: str, tokenizer, *, classes: int, min_words: int, heldout_fraction: float,
                      seq_len: int) -> TextSplits:
    """Read, split and tokenize the records (see the module docstring); refuses a split with an empty side."""
    records, names = pydoc_records(classes, min_words) if dataset == "pydoc" else jsonl_records(dataset, min_words)
    index = {name: i for i, name in enumerate(names)}
    train, heldout, truncated = [], [], 0
    for uid, text, label in records:
        ids = tokenizer(text, verbose=False)["input_ids"]
        if len(ids) > seq_len:  # keep [CLS] + the first tokens + [SEP], as the tokenizer's truncation does
            ids, truncated = ids[:seq_len - 1] + ids[-1:], truncated + 1
        example = TextExample(uid, text, torch.tensor(ids, dtype=torch.long), index.get(label, -1))
        (heldout if is_heldout(text, heldout_fraction) else train).append(example)
    if not train or not heldout:
        raise ValueError(f"mlm.dataset={dataset}: {len(train)} training and {len(heldout)} held-out texts; give more "
                         "texts or change mlm.heldout_fraction")
    stats = {"train": len(train), "heldout": len(heldout), "truncated": truncated, "seq_len": seq_len,
             "train_labelled": sum(e.label >= 0 for e in train), "heldout_labelled": sum(e.label >= 0 for e in heldout)}
    return TextSplits(dataset, train, heldout, names, stats)
