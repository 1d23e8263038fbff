"""Data: readers, formats, tokenization with target masks, packing, splits, sampling.

``build_splits(cfg.data, tokenizer, seed)`` gives the training and held-out
:class:`Example` lists; :class:`ExampleSampler` picks micro-batches;
:func:`collate` turns them into a :class:`Batch` (the one causal shift).
"""

from stillroom.data.batch import IGNORE, Batch, Example, collate
from stillroom.data.errors import BadRecord, DataError
from stillroom.data.pipeline import DataSplits, build_splits
from stillroom.data.batch import ExampleSampler

__all__ = [
    "IGNORE",
    "BadRecord",
    "Batch",
    "DataError",
    "DataSplits",
    "Example",
    "ExampleSampler",
    "build_splits",
    "collate",
]
