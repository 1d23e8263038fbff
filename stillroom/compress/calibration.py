"""Calibration batches for pruning: packed token blocks drawn from data sources.

Pruning measures activations (width importance, Wanda, SparseGPT) and hidden-state
distances (angular, block influence) on a few batches of real text. Every record of
every source is read and encoded by the one data pipeline (:mod:`stillroom.data`:
readers, bad-record policy, the text / prompt_completion / messages formats), then
the records' full token sequences (not truncated) are concatenated per source and
cut into ``seq_len`` blocks, so there is no padding and no attention mask to carry.
``batches * batch_size`` blocks are drawn from the pooled blocks of all sources by a
permutation seeded with ``seed``: the same sources and seed give the same batches.
"""

from __future__ import annotations

import torch

from stillroom.config.core import DataConfig, DataSource
from stillroom.data.encoders import PlainEncoder
from stillroom.data.errors import DataError
from stillroom.data.readers import describe
from stillroom.data.records import source_tags, split_position
from stillroom.data.sequences import COUNTS, SequenceBuilder


def calibration_batches(tokenizer, sources: list[DataSource], *, seq_len: int, batches: int, batch_size: int,
                        seed: int = 0, exclude_heldout_fraction: float = 0.0) -> list[torch.Tensor]:
    """``batches`` LongTensors ``[batch_size, seq_len]`` of input ids (CPU), no padding.

    ``exclude_heldout_fraction``: records the training pipeline holds out at this
    ``data.heldout_fraction`` are skipped, so pruning never looks at the text a run is
    later measured on. Raises :class:`DataError` naming the sources when they hold fewer than
    ``batches * batch_size * seq_len`` tokens (and how to fix it).
    """
    if not sources:
        raise DataError("calibration needs at least one data source: set prune.calibration.sources or data.sources")
    need = batches * batch_size
    blocks_ns: list[torch.Tensor] = []
    tokens_by_source: list[str] = []
    for src, tag in zip(sources, source_tags(sources)):
        ids_n = _source_tokens(tokenizer, src, tag, seed, exclude_heldout_fraction)
        n_blocks = ids_n.numel() // seq_len
        tokens_by_source.append(f"{describe(src).label}: {ids_n.numel()} tokens")
        if n_blocks:
            blocks_ns.append(ids_n[: n_blocks * seq_len].view(n_blocks, seq_len))
    pooled_ns = torch.cat(blocks_ns) if blocks_ns else torch.empty(0, seq_len, dtype=torch.long)
    if pooled_ns.shape[0] < need:
        raise DataError(
            f"calibration data too small: {batches} batches x {batch_size} sequences x {seq_len} tokens need "
            f"{need * seq_len} tokens in {need} whole blocks, but the sources hold {'; '.join(tokens_by_source)} "
            f"({pooled_ns.shape[0]} blocks); add data or lower prune.calibration.batches / batch_size / seq_len")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(pooled_ns.shape[0], generator=gen)[:need]
    chosen_ns = pooled_ns[order]
    return [chosen_ns[b * batch_size:(b + 1) * batch_size].clone() for b in range(batches)]


def _source_tokens(tokenizer, src: DataSource, tag: str, seed: int, heldout_fraction: float) -> torch.Tensor:
    """Every usable record of ``src`` (minus held-out ones) encoded whole and concatenated: LongTensor [n]."""
    builder = SequenceBuilder(DataConfig(sources=[src]), tokenizer, seed, PlainEncoder())
    _fmt, records = builder.read(src, tag, {k: 0 for k in COUNTS})
    ids: list[int] = []
    for record in records:
        if split_position(record.key) >= heldout_fraction:
            ids.extend(record.views.plain.input_ids)
    return torch.tensor(ids, dtype=torch.long)
