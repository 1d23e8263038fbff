"""Append-only JSONL store for teacher generations: resumable and crash-safe.

One line per generated sample::

    {"key": "<prompt_id>#<sample_index>", "prompt_id": ..., "sample_index": int,
     "teacher": str, "settings": {...}, "text": str | null, "error": str (optional)}

Guarantees:
- Each ``append`` writes its whole batch with one ``write`` call, then
  ``flush`` + ``fsync``: after ``append`` returns, the batch survives a crash.
- A crash mid-write can leave a torn last line (no newline, or not valid JSON).
  Opening the store for writing detects it, truncates it away, logs a warning
  and counts it in ``torn_lines_repaired``; the lost samples are simply not in
  ``done_keys()`` and get generated again. A bad line *before* the last one is
  real corruption and raises :class:`StoreCorruptError` naming ``file:line``.
- A key is never written twice: ``append`` skips keys already stored (and
  duplicates inside one batch) and counts them in ``duplicates_skipped``.
- One writer at a time: a writable store holds an exclusive ``flock`` on the
  file while open (released automatically if the process dies).

Records with an ``error`` field (malformed teacher output) are stored and
counted (``errors``); they are "done" and are not retried by a rerun.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

try:  # POSIX advisory locking; absent on Windows, where the lock is skipped.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

REQUIRED = {"key": str, "prompt_id": str, "sample_index": int, "teacher": str, "settings": dict}


class StoreCorruptError(RuntimeError):
    """The store file has a malformed line that is not a torn tail."""


class StoreLockedError(RuntimeError):
    """Another process is writing to the same store."""


def make_key(prompt_id: str, sample_index: int) -> str:
    """The store key of one sample: ``f"{prompt_id}#{sample_index}"``."""
    return f"{prompt_id}#{sample_index}"


def validate_record(rec: object) -> str | None:
    """Return a description of what is wrong with ``rec``, or None if it is a valid record."""
    if not isinstance(rec, dict):
        return f"record must be a JSON object, got {type(rec).__name__}"
    for name, typ in REQUIRED.items():
        if name not in rec:
            return f"record is missing {name!r}"
        value = rec[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            return f"{name!r} must be {typ.__name__}, got {type(value).__name__}"
    if rec["sample_index"] < 0:
        return "'sample_index' must be >= 0"
    if rec["key"] != make_key(rec["prompt_id"], rec["sample_index"]):
        return f"'key' {rec['key']!r} != prompt_id#sample_index {make_key(rec['prompt_id'], rec['sample_index'])!r}"
    if "text" not in rec or not (rec["text"] is None or isinstance(rec["text"], str)):
        return "'text' must be present and a str (or null for an error record)"
    if "error" in rec and not isinstance(rec["error"], str):
        return "'error' must be a str"
    if rec["text"] is None and "error" not in rec:
        return "'text' may be null only in a record with an 'error'"
    return None


class GenerationStore:
    """Append-only, resumable JSONL store of generated samples (see module docstring).

    ``GenerationStore(path)`` opens (or creates) the store for writing, repairing
    a torn tail. ``read_only=True`` never modifies the file and ignores a torn
    tail instead. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.torn_lines_repaired = 0
        self.duplicates_skipped = 0
        self._keys: set[str] = set()
        self._errors = 0
        self._settings_seen: dict[str, dict] = {}
        self._fd: int | None = None
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"generation store {self.path} does not exist")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._lock()
            if created:
                _fsync_dir(self.path.parent)
        try:
            self._load()
        except BaseException:
            self.close()  # release the lock: a corrupt store must not block the next attempt
            raise

    # ------------------------------------------------------------------ opening

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._fd)
            self._fd = None
            raise StoreLockedError(
                f"generation store {self.path} is open for writing in another process; "
                "wait for it to finish or use another path"
            ) from e

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # split() leaves "" after a final newline; anything else there is a line without its newline.
        complete, tail = lines[:-1], lines[-1]
        records: list[tuple[int, dict]] = []
        bad_at: int | None = None
        for i, raw in enumerate(complete):
            rec, problem = _parse(raw)
            if problem is not None:
                if i != len(complete) - 1 or tail:
                    raise StoreCorruptError(
                        f"{self.path}:{i + 1}: {problem}. Only the last line can be torn by a crash, so this is "
                        "corruption: fix or delete that line, or start a new store"
                    )
                bad_at = i
                break
            records.append((i, rec))
        keep_bytes = len(data)
        torn = 0
        if tail:  # final line lacks its newline: torn by a crash mid-write
            keep_bytes -= len(tail)
            torn += 1
        if bad_at is not None:  # last complete line is not a valid record: the torn end of a write
            keep_bytes -= len(complete[bad_at]) + 1
            torn += 1
        if torn:
            if self.read_only:
                log.warning("%s: ignoring a torn tail of %d line(s) (read-only)", self.path, torn)
            else:
                os.ftruncate(self._fd, keep_bytes)
                os.fsync(self._fd)
                self.torn_lines_repaired = torn
                log.warning("%s: removed %d torn line(s) left by an interrupted write; "
                            "those samples will be generated again", self.path, torn)
        for i, rec in records:
            if rec["key"] in self._keys:
                raise StoreCorruptError(f"{self.path}:{i + 1}: duplicate key {rec['key']!r}")
            self._note(rec)

    def _note(self, rec: dict) -> None:
        self._keys.add(rec["key"])
        if "error" in rec:
            self._errors += 1
        sig = json.dumps([rec["teacher"], rec["settings"]], sort_keys=True)
        self._settings_seen.setdefault(sig, {"teacher": rec["teacher"], "settings": rec["settings"]})

    # ------------------------------------------------------------------ queries

    def done_keys(self) -> set[str]:
        """Keys already stored (including error records). A copy."""
        return set(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def errors(self) -> int:
        """Number of stored records that carry an ``error``."""
        return self._errors

    def teacher_settings(self) -> list[dict]:
        """Distinct ``{"teacher", "settings"}`` pairs present in the store."""
        return list(self._settings_seen.values())

    def read(self) -> list[dict]:
        """All valid records in file order (a torn tail, if any, is left out)."""
        data = self.path.read_bytes()
        out = []
        lines = data.split(b"\n")
        for i, raw in enumerate(lines[:-1]):
            rec, problem = _parse(raw)
            if problem is not None:
                if i == len(lines) - 2 and not lines[-1]:
                    break  # torn last line (read-only view of a store being written)
                raise StoreCorruptError(f"{self.path}:{i + 1}: {problem}")
            out.append(rec)
        return out

    def stats(self) -> dict:
        return {
            "records": len(self._keys),
            "errors": self._errors,
            "torn_lines_repaired": self.torn_lines_repaired,
            "duplicates_skipped": self.duplicates_skipped,
        }

    # ------------------------------------------------------------------ writing

    def append(self, records: list[dict]) -> int:
        """Durably append ``records``; returns how many were written.

        Invalid records raise ``ValueError`` before anything is written. Keys
        already stored, or repeated within ``records``, are skipped and counted.
        """
        if self.read_only or self._fd is None:
            raise RuntimeError(f"generation store {self.path} is not open for writing")
        fresh: list[dict] = []
        batch_keys: set[str] = set()
        for j, rec in enumerate(records):
            problem = validate_record(rec)
            if problem is not None:
                raise ValueError(f"record {j} of the batch for {self.path}: {problem}")
            if rec["key"] in self._keys or rec["key"] in batch_keys:
                self.duplicates_skipped += 1
                continue
            batch_keys.add(rec["key"])
            fresh.append(rec)
        if not fresh:
            return 0
        blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in fresh).encode("utf-8")
        view = memoryview(blob)
        while view:  # os.write may write less than asked
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        for rec in fresh:
            self._note(rec)
        return len(fresh)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the flock
            self._fd = None

    def __enter__(self) -> GenerationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is preferred
        try:
            self.close()
        except Exception:
            pass


def _parse(raw: bytes) -> tuple[dict | None, str | None]:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not valid JSON ({e.__class__.__name__}: {e})"
    problem = validate_record(rec)
    return (rec, None) if problem is None else (None, problem)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
