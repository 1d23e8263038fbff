"""MinED: map every teacher token to the student token spelled closest to it (``teacher.cross.vocab_map``).

FuseLLM (Wan et al. 2024, "Knowledge Fusion of Large Language Models") projects one model's next-token
distribution onto another model's vocabulary by *minimum edit distance*: each source token counts for the
target token whose string is closest to it (an identical string first). stillroom measures the distance
on the tokens' bytes (:mod:`stillroom.teachers.token_bytes`), so a byte-level BPE and a SentencePiece
vocabulary compare on the text they spell: ``" the"`` and ``"▁the"`` are the same token.

Rules (deterministic, independent of thread count):

* distance: Levenshtein (insert, delete, substitute one byte, each 1) between the two byte strings;
* the student tokens with the smallest distance win; among them the one sharing the longest common prefix
  with the teacher token, then the lowest id;
* special tokens take no part here (the caller maps them by content or role); a student token that spells
  nothing is no candidate.

Cost: ``V_t x V_s`` distances (49,152 x 8,192 = 4e8 for SmolLM2 and an 8k BPE). They are computed with
``rapidfuzz`` (bit-parallel Levenshtein in C++, all cores) in blocks of teacher rows, and the map is cached as a
safetensors file keyed by both byte tables, written atomically (see :func:`min_edit_map`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

VERSION = 1
"""Bumped when the rules above change, so an old cached map is not reused."""

INSTALL = "pip install 'stillroom[cross]'"


def _rapidfuzz():
    try:
        from rapidfuzz import process
        from rapidfuzz.distance import Levenshtein
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("teacher.cross.vocab_map=min_edit_distance computes edit distances with rapidfuzz, which "
                          f"is not installed; install the optional extra: {INSTALL}") from exc
    return process, Levenshtein


def edit_distance(a: bytes, b: bytes) -> int:
    """Levenshtein distance between two byte strings (the rule :func:`min_edit_map` uses)."""
    _, lev = _rapidfuzz()
    return int(lev.distance(a.decode("latin-1"), b.decode("latin-1")))


def map_key(teacher: list[bytes | None], student: list[bytes | None]) -> str:
    """sha256 over :data:`VERSION` and both byte tables (what the map depends on, nothing else)."""
    h = hashlib.sha256(f"min_edit v{VERSION} {len(teacher)} {len(student)}\n".encode())
    for table in (teacher, student):
        for b in table:
            h.update(b"\x00" if b is None else len(b).to_bytes(4, "little") + b)
        h.update(b"\xff")
    return h.hexdigest()


def min_edit_map(teacher: list[bytes | None], student: list[bytes | None], *, cache_dir: str | Path | None = None,
                 block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student_of_teacher [V_t], distance [V_t])``, both long: for each teacher token (``None``: special, no
    candidate, maps to -1 at distance -1) the closest student token by the rules of this module.

    ``teacher``/``student``: byte tables (``spelled[:vocab]`` of each side; ``None`` for special tokens).
    ``cache_dir``: where the map is kept as ``min_edit-<key>.safetensors`` (key: :func:`map_key`), written to a
    temporary file and renamed, so a crashed or concurrent run never leaves half a file. ``block``: teacher rows
    per distance matrix (``block x V_s`` int32).
    """
    path = Path(cache_dir) / f"min_edit-{map_key(teacher, student)[:32]}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        saved = load_file(str(path))
        return saved["student_of_teacher"], saved["distance"]
    out, dist = _compute(teacher, student, block)
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"student_of_teacher": out, "distance": dist}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return out, dist


def _compute(teacher: list[bytes | None], student: list[bytes | None], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    process, lev = _rapidfuzz()
    out = torch.full((len(teacher),), -1, dtype=torch.long)
    dist = torch.full((len(teacher),), -1, dtype=torch.long)
    cand = np.array([i for i, b in enumerate(student) if b], dtype=np.int64)  # ascending ids
    if cand.size == 0:
        return out, dist
    exact: dict[bytes, int] = {}
    for i in cand.tolist():
        exact.setdefault(student[i], i)  # the lowest id spelling these bytes
    rest = []
    for j, b in enumerate(teacher):
        if b is None:
            continue
        if b in exact:
            out[j], dist[j] = exact[b], 0
        else:
            rest.append(j)
    s_str = [student[i].decode("latin-1") for i in cand.tolist()]
    s_pad = _padded([student[i] for i in cand.tolist()], fill=-1)
    for lo in range(0, len(rest), block):
        rows = rest[lo: lo + block]
        t_bytes = [teacher[j] for j in rows]
        d = process.cdist([b.decode("latin-1") for b in t_bytes], s_str, scorer=lev.distance, dtype=np.int32,
                          workers=-1)  # [n, C]
        best = d.min(axis=1)
        r, c = np.nonzero(d == best[:, None])  # every tie, row-major: ascending candidate within a row
        pick = _tie_break(r, c, _padded(t_bytes, fill=-2), s_pad, len(rows))
        out[rows] = torch.from_numpy(cand[pick])
        dist[rows] = torch.from_numpy(best.astype(np.int64))
    return out, dist


def _padded(table: list[bytes], *, fill: int) -> np.ndarray:
    """``[n, L]`` int16 bytes of each string, padded with ``fill`` (a value no byte and no other pad takes)."""
    width = max(1, max((len(b) for b in table), default=1))
    arr = np.full((len(table), width), fill, dtype=np.int16)
    for k, b in enumerate(table):
        arr[k, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return arr


def _tie_break(r: np.ndarray, c: np.ndarray, t_pad: np.ndarray, s_pad: np.ndarray, n: int) -> np.ndarray:
    """``[n]`` the chosen candidate column per row among the tied pairs ``(r, c)`` (sorted by row, then column):
    the longest common prefix with the teacher token, then the lowest column. Pairs are compared ``2**24 / L``
    at a time (``[pairs, L]`` buffers of at most 32 MiB)."""
    width = min(t_pad.shape[1], s_pad.shape[1])
    pairs = max(1024, (1 << 24) // width)
    prefix = np.empty(r.size, dtype=np.int64)
    for lo in range(0, r.size, pairs):
        rr, cc = r[lo: lo + pairs], c[lo: lo + pairs]
        same = t_pad[rr, :width] == s_pad[cc, :width]  # [p, L]
        prefix[lo: lo + pairs] = np.cumprod(same, axis=1, dtype=np.int8).sum(axis=1)
    # the best pair per row: sort by (row, -prefix, column) and take each row's first
    order = np.lexsort((c, -prefix, r))
    first = np.ones(order.size, dtype=bool)
    first[1:] = r[order][1:] != r[order][:-1]
    chosen = order[first]
    pick = np.empty(n, dtype=np.int64)
    pick[r[chosen]] = c[chosen]
    return pick
