"""``teacher.store.id_code: ranked``: a shard's token ids in fewer bits than their fixed-width integers.

Ids dominate a small store's bytes (at k = 8 int8 + 16 tail draws, 48 of 62 bytes per position are ids at 2 bytes
each), and their distribution is far from uniform: in the study's stores a head id carries about 9 bits of
information and a tail draw about 12, against the 16 stored (docs/BENCHMARKS.md, "Store size"). This code spends
close to that, with nothing shared between shards and a decode of a few vectorised numpy calls. For each coded
tensor ``X`` of a shard (``topk_ids``, ``tail_ids``):

* its ids are ranked by how often they occur in ``X`` (ties by id), and the ranks cut into four classes of
  consecutive ranks: class ``c`` holds ``2**w_c`` ranks after those of the classes before it, the last the rest,
  widths chosen for the fewest bits (:func:`choose_widths`); frequent ids land in narrow classes;
* each occurrence is stored as its 2-bit class (``X.classes``, four per byte) and its index among its class's
  ids, taken in id order, in ``w_c`` bits (``X.bits``: each class's indices in a byte-aligned run of their own);
* the table is which ids occur (``X.present``, a bitmap over the vocabulary) and each one's class (``X.id_classes``,
  2 bits each, in id order): V / 8 + U / 4 bytes for U distinct ids, a quarter of a list of ranks, because within
  a class the order does not change a code's length;
* ``X.layout`` is ``[w_0, w_1, w_2, w_3, *shape]``.

The reader decodes a shard whole when it loads it (:func:`decode_ids`), so every other reader path sees plain
``topk_ids`` / ``tail_ids``, bit for bit what a ``plain`` store holds (tests/unit/teachers/test_store_ids.py).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

CODED = ("topk_ids", "tail_ids")
"""The shard tensors ``id_code: ranked`` codes (where a shard holds them)."""
CLASSES = 4


def rank_table(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[U]`` int64: the ids occurring in ``ids``, most frequent first (ties by id: deterministic)."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)
    return order[: int((counts > 0).sum())]


def choose_widths(ranks: torch.Tensor, distinct: int) -> list[int]:
    """The four class widths ``[w_0..w_3]`` that code ``ranks`` (``[n]`` int64, each in ``[0, distinct)``) in the
    fewest bits: class ``c`` covers ``2**w_c`` ranks after those of the classes before it; ``w_3`` covers the
    rest. An exhaustive search over ``w_0..w_2`` on the rank histogram (at most 18**3 sums)."""
    top = max(1, int(np.ceil(np.log2(max(distinct, 2)))))
    cum = np.concatenate([[0], np.cumsum(np.bincount(ranks.numpy(), minlength=distinct))])

    def below(r: int) -> int:  # how many ranks are < r
        return int(cum[min(r, distinct)])

    best, best_bits = [top] * CLASSES, below(distinct) * top
    for ws in itertools.product(range(top + 1), repeat=CLASSES - 1):
        start, bits = 0, 0
        for w in ws:
            end = start + (1 << w)
            bits += (below(end) - below(start)) * w
            start = end
        last = int(np.ceil(np.log2(distinct - start))) if distinct - start > 1 else 0  # 0: one rank or none left
        bits += (below(distinct) - below(start)) * last
        if bits < best_bits:
            best, best_bits = [*ws, last], bits
    return best


MAX_WIDTH = 25
"""The widest field :func:`pack_bits` handles (a value and its bit offset fit four bytes): ranks below 2**25."""


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """``values`` (``[n]`` int64, each in ``[0, 2**width)``) as ``ceil(n * width / 8)`` bytes, least significant
    bit first. Each value's bits land in at most four bytes it shares with no other value's bits, so summing the
    bytes' shares (one weighted ``bincount`` per byte lane) is the bitwise OR, with no ``[n, width]`` bit matrix."""
    if width == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if width > MAX_WIDTH:
        raise ValueError(f"a {width}-bit field is wider than {MAX_WIDTH} bits")
    pos = np.arange(values.size, dtype=np.int64) * width
    size = (values.size * width + 7) // 8
    shifted = values.astype(np.int64) << (pos & 7)
    out = np.zeros(size + 4, dtype=np.int64)
    for lane in range((width + 7 + 7) // 8):
        out += np.bincount((pos >> 3) + lane, weights=(shifted >> (8 * lane)) & 0xFF,
                           minlength=size + 4).astype(np.int64)
    return out[:size].astype(np.uint8)


def unpack_bits(data: np.ndarray, width: int, n: int) -> np.ndarray:
    """The ``n`` values of ``width`` bits :func:`pack_bits` wrote into ``data`` (``[n]`` int64): the four bytes at
    each value's first byte read as one little-endian word (a strided view, one gather), shifted and masked;
    2-bit values (the classes) through a table of the four in each byte."""
    if width == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if width == 2:
        return _QUARTERS[data].reshape(-1)[:n].astype(np.int64)
    padded = np.concatenate([data, np.zeros(4, dtype=np.uint8)])
    words = np.ndarray(shape=(data.size + 1,), dtype="<u4", buffer=padded, strides=(1,))
    pos = np.arange(n, dtype=np.int64) * width
    return ((words[pos >> 3] >> (pos & 7).astype(np.uint32)) & np.uint32((1 << width) - 1)).astype(np.int64)


_QUARTERS = ((np.arange(256)[:, None] >> np.array([0, 2, 4, 6])) & 3).astype(np.uint8)
"""``[256, 4]``: the four 2-bit values of each byte, least significant first."""


def encode_stream(ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """``{present, id_classes, classes, bits, layout}`` of one id tensor (any shape; see the module docstring)."""
    flat = ids.reshape(-1).long()
    table = rank_table(flat, vocab_size)
    widths = choose_widths(_ranks(flat, table, vocab_size), table.numel())
    starts = np.cumsum([0] + [1 << w for w in widths[:-1]])
    class_of_rank = np.searchsorted(starts, np.arange(table.numel()), side="right") - 1
    id_class = np.zeros(vocab_size, dtype=np.int64)
    id_class[table.numpy()] = class_of_rank
    present = np.zeros(vocab_size, dtype=bool)
    present[table.numpy()] = True
    members = np.flatnonzero(present)  # the ids occurring, in id order
    index_in_class = np.zeros(vocab_size, dtype=np.int64)
    for c in range(CLASSES):
        ids_c = members[id_class[members] == c]
        index_in_class[ids_c] = np.arange(ids_c.size)
    sym = flat.numpy()
    cls = id_class[sym]
    runs = [pack_bits(index_in_class[sym[cls == c]], widths[c]) for c in range(CLASSES)]
    return {"present": torch.from_numpy(np.packbits(present, bitorder="little")),
            "id_classes": torch.from_numpy(pack_bits(id_class[members], 2)),
            "classes": torch.from_numpy(pack_bits(cls, 2)),
            "bits": torch.from_numpy(np.concatenate(runs)),
            "layout": torch.tensor([*widths, *ids.shape], dtype=torch.int64)}


def _ranks(flat: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    rank_of = torch.zeros(vocab_size, dtype=torch.int64)
    rank_of[table] = torch.arange(table.numel())
    return rank_of[flat]


def decode_stream(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ids (int64, the original shape) of one tensor :func:`encode_stream` coded."""
    layout = parts["layout"]
    widths, shape = [int(w) for w in layout[:CLASSES]], [int(d) for d in layout[CLASSES:]]
    n = int(np.prod(shape)) if shape else 1
    members = np.flatnonzero(np.unpackbits(parts["present"].numpy(), bitorder="little"))
    id_class = unpack_bits(parts["id_classes"].numpy(), 2, members.size)
    cls = unpack_bits(parts["classes"].numpy(), 2, n)
    out, data, at = np.empty(n, dtype=np.int64), parts["bits"].numpy(), 0
    for c in range(CLASSES):
        where = cls == c
        count = int(where.sum())
        size = (count * widths[c] + 7) // 8
        out[where] = members[id_class == c][unpack_bits(data[at : at + size], widths[c], count)]
        at += size
    return torch.from_numpy(out).reshape(shape)


PARTS = ("present", "id_classes", "classes", "bits", "layout")


def encode_ids(tensors: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """``tensors`` (a shard's, as :func:`~stillroom.teachers.store_format.encode_rows` builds them) with each of
    :data:`CODED` it holds replaced by its coded parts ``<name>.<part>``."""
    out = {k: v for k, v in tensors.items() if k not in CODED}
    for name in CODED:
        if name in tensors:
            out.update({f"{name}.{part}": t.contiguous()
                        for part, t in encode_stream(tensors[name], vocab_size).items()})
    return out


def decode_ids(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A shard's tensors with coded ids decoded back to plain ``topk_ids`` / ``tail_ids`` in ``dtype`` (the
    manifest's ``id_dtype``); a shard without coded ids is returned as it is."""
    coded = [name for name in CODED if f"{name}.layout" in tensors]
    if not coded:
        return tensors
    out = {k: v for k, v in tensors.items() if k.split(".")[0] not in coded}
    for name in coded:
        out[name] = decode_stream({p: tensors[f"{name}.{p}"] for p in PARTS}).to(dtype)
    return out
