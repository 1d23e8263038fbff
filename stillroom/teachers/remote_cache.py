"""The resumable cache of a remote teacher: rows already answered are not asked again.

A remote teacher is slow and may cost money per request, and a run can die half-way
(server down, crash, SIGKILL). Every finished row is appended (and fsynced) as it
arrives, so a rerun or ``stillroom run ... --resume`` asks only what is missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stillroom.teachers.http import RemoteError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_FORMAT = "stillroom-remote-cache"

_FIELD_WORDS = {"format": "file format", "version": "format version", "model": "model", "top_k": "top_k"}


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape)


def ids_digest(ids: Sequence[int], salt: str | None = None) -> str:
    """Hash of a row's token ids and, when given, ``salt`` (the digest of what else the row sends, e.g. its image
    bytes): a cached row is reused only for the very same tokens and the same extra input."""
    text = ",".join(map(str, ids)) + (f"|{salt}" if salt is not None else "")
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


class RemoteCache:
    """Append-only JSONL file of finished rows: ``uid -> (top-k ids [L-1, K], log-probs [L-1, K])``.

    Line 1 is a header ``{"format", "version", "model", "top_k"}``; reopening with
    another model or top_k is an error (its rows would be the wrong distribution).
    Each further line is one row (arrays as base64 little-endian int32/float32, exact).
    Every :meth:`put` writes one line and fsyncs. A torn last line (crash mid-write)
    is dropped on open; a bad line before it is corruption and raises naming
    ``file:line``. One writer at a time (``flock``). A row is reused only when its
    token ids hash matches (same uid with other tokens, e.g. another seq_len, is
    asked again); a row that sends an image hashes its bytes in too (a changed image is asked again).
    """

    def __init__(self, path: str | os.PathLike, *, model: str | None, top_k: int) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.header = {"format": CACHE_FORMAT, "version": 1, "model": model, "top_k": top_k}
        self._rows: dict[str, tuple[str, str, str, int]] = {}
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise RemoteError(f"remote cache {self.path} is open for writing elsewhere (another process or "
                                  "RemoteTeacher); close it or set another teacher.remote.cache") from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        data = self.path.read_bytes()
        if not data:
            self._write(json.dumps(self.header, sort_keys=True))
            return
        lines = data.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        keep = len(data) - len(torn)
        for i, raw in enumerate(complete):
            try:
                rec = json.loads(raw)
                if i > 0:
                    self._rows[rec["uid"]] = (rec["digest"], rec["ids"], rec["logprobs"], int(rec["n"]))
            except (ValueError, KeyError, TypeError) as err:
                if i == len(complete) - 1 and not torn and i > 0:
                    keep -= len(raw) + 1
                    break
                raise RemoteError(f"{self.path}:{i + 1}: not a remote-cache record ({err}); delete the file "
                                  "to start over (its rows will be asked again)") from None
            if i == 0:
                self._check_header(rec)
        if keep != len(data):
            log.warning("%s: dropping a torn last line left by an interrupted write", self.path)
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)

    def _check_header(self, rec: object) -> None:
        """Refuse a cache written for another teacher, naming what differs and how to go on."""
        stored = {k: rec.get(k) for k in self.header} if isinstance(rec, dict) else {}
        differ = [k for k in self.header if stored.get(k) != self.header[k]]
        if not differ:
            return
        what = ", ".join(f"{_FIELD_WORDS[k]} {stored.get(k)!r} (this run: {self.header[k]!r})" for k in differ)
        raise RemoteError(f"{self.path}:1: this remote cache was written for another teacher setting: {what}. "
                          "Its rows cannot be reused. Set teacher.remote.cache=<another path>.jsonl to keep it, or "
                          f"delete {self.path} to start over (its rows will be asked again)")

    def _write(self, line: str) -> None:
        os.write(self._fd, (line + "\n").encode("utf-8"))
        os.fsync(self._fd)

    def get(self, uid: str, ids: Sequence[int], salt: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids [L-1, K] int32, logprobs [L-1, K] float32)`` if ``uid`` is cached for these token ids (and
        ``salt``: the digest of the row's extra input, see :func:`ids_digest`)."""
        row = self._rows.get(uid)
        if row is None or row[0] != ids_digest(ids, salt):
            return None
        _, ids_b64, lp_b64, n = row
        k = self.header["top_k"]
        return _unb64(ids_b64, "<i4", (n, k)), _unb64(lp_b64, "<f4", (n, k))

    def put(self, uid: str, ids: Sequence[int], top_ids: np.ndarray, top_lp: np.ndarray, *,
            salt: str | None = None) -> None:
        """Append one finished row (fsynced before returning, so a crash right after keeps it)."""
        rec = {"uid": uid, "digest": ids_digest(ids, salt), "n": int(top_ids.shape[0]),
               "ids": _b64(top_ids.astype("<i4")), "logprobs": _b64(top_lp.astype("<f4"))}
        self._write(json.dumps(rec))
        self._rows[uid] = (rec["digest"], rec["ids"], rec["logprobs"], rec["n"])

    def __len__(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
