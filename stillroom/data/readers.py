"""Readers: one :class:`DataSource` -> a stream of raw records.

Each reader yields :class:`RawRecord` (a dict of fields, its position in the
source and a human location such as ``data.jsonl:17``) or :class:`BadRecord`
for something it could not read; the pipeline applies ``data.on_bad_record``.
``RawRecord.index`` counts every record position, bad ones included, so that
skipping a bad line never changes the identity of the records after it.

Supported sources:

* ``.jsonl``: one JSON object per line; blank lines are ignored (they are not
  records). Invalid JSON, non-UTF-8 bytes or a non-object line is a bad record.
* ``.json``: a JSON list of objects (a file that is not valid JSON at all is a
  :class:`DataError`; a list element that is not an object is a bad record).
* ``.parquet``: rows read with pyarrow, in file order.
* ``.txt``: **one document per blank-line-separated block** (a paragraph or a
  run of consecutive non-blank lines). Blocks keep their inner newlines. This
  keeps held-out splits finer than a whole file; put a document on consecutive
  lines to keep it whole.
* ``dataset``: a local folder written by ``Dataset.save_to_disk`` is read with
  ``datasets.load_from_disk`` (``split`` picks from a ``DatasetDict``); any
  other folder or name goes to ``datasets.load_dataset(name, dataset_config,
  split=split)``, which honours ``HF_HUB_OFFLINE``.
* ``bundled``: see :mod:`stillroom.data.bundled`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from stillroom.config.core import DataSource
from stillroom.data.bundled import bundled_records
from stillroom.data.errors import BadRecord, DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class RawRecord:
    """One record as read: ``fields`` (a dict), ``index`` (position in the source), ``where``."""

    fields: dict
    index: int
    where: str


@dataclass(frozen=True)
class SourceInfo:
    """``tag``: short stable name used in uids; ``label``: how errors name it; ``default_format``."""

    tag: str
    label: str
    default_format: Literal["text", "prompt_completion", "messages"] | None


Item = RawRecord | BadRecord


def describe(src: DataSource) -> SourceInfo:
    """Name a source (for uids and messages) and give its default format, if any."""
    if src.path is not None:
        p = Path(src.path)
        return SourceInfo(tag=p.stem or p.name, label=str(p), default_format="text" if p.suffix == ".txt" else None)
    if src.dataset is not None:
        name = src.dataset.rstrip("/").replace("\\", "/").split("/")[-1] or src.dataset
        tag = name if src.dataset_config is None else f"{name}-{src.dataset_config}"
        return SourceInfo(tag=f"{tag}-{src.split}", label=f"dataset {src.dataset!r} (split {src.split!r})", default_format=None)
    assert src.bundled is not None
    default = "text" if src.bundled == "pydoc" else None
    return SourceInfo(tag=src.bundled, label=f"bundled:{src.bundled}", default_format=default)


def read_source(src: DataSource, seed: int) -> Iterator[Item]:
    """Yield the raw records of ``src`` (not limited; the pipeline applies ``limit``)."""
    if src.path is not None:
        return _read_path(Path(src.path))
    if src.dataset is not None:
        return _read_dataset(src)
    return (RawRecord(fields, i, where) for i, (fields, where) in
            enumerate(bundled_records(src.bundled, seed=seed, limit=src.limit)))


def _read_path(path: Path) -> Iterator[Item]:
    if not path.exists():
        raise DataError(f"data source {path}: file not found (check data.sources[].path)")
    if path.is_dir():
        raise DataError(f"data source {path}: is a folder; use data.sources[].dataset for a dataset folder")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"data source {path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return readers[suffix](path)


def _read_jsonl(path: Path) -> Iterator[Item]:
    index = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRecord(f"not valid UTF-8 ({e.reason} at byte {e.start})", where)
                index += 1
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRecord(f"invalid JSON ({e.msg}: column {e.colno})", where)
            else:
                if isinstance(obj, dict):
                    yield RawRecord(obj, index, where)
                else:
                    yield BadRecord(f"expected a JSON object, got {type(obj).__name__}", where)
            index += 1


def _read_json(path: Path) -> Iterator[Item]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}: column {e.colno}); a .json source must be a list of objects") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of objects, got {type(data).__name__}; for one object per line use .jsonl"
        )
    for i, obj in enumerate(data):
        where = f"{path}[{i}]"
        if isinstance(obj, dict):
            yield RawRecord(obj, i, where)
        else:
            yield BadRecord(f"expected a JSON object, got {type(obj).__name__}", where)


def _read_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as parquet ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRecord(row, i, f"{path}[row {i}]")
            i += 1


def _read_txt(path: Path) -> Iterator[Item]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); convert the file to UTF-8") from None
    block: list[str] = []
    start = 0
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not block:
                start = line_no
            block.append(line)
        elif block:
            yield RawRecord({"text": "\n".join(block)}, index, f"{path}:{start}")
            index += 1
            block = []
    if block:
        yield RawRecord({"text": "\n".join(block)}, index, f"{path}:{start}")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists() or (
        folder / "state.json"
    ).exists()


def _read_dataset(src: DataSource) -> Iterator[Item]:
    import datasets

    name = src.dataset
    folder = Path(name)
    try:
        if folder.is_dir() and _is_saved_dataset(folder):
            ds = datasets.load_from_disk(str(folder))
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    raise DataError(
                        f"dataset folder {name}: no split {src.split!r}; it has {sorted(ds)} (set data.sources[].split)"
                    )
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(name, src.dataset_config, split=src.split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"dataset {name!r} (config {src.dataset_config!r}, split {src.split!r}) could not be loaded: "
            f"{type(e).__name__}: {e}. A local folder must come from Dataset.save_to_disk; a hub name needs "
            "network access or a filled cache (HF_HUB_OFFLINE=1 uses the cache only)"
        ) from None
    label = f"{name}[{src.split}]"
    return _iter_rows(ds, label)


def _iter_rows(ds, label: str) -> Iterator[Item]:
    for i, row in enumerate(ds):
        yield RawRecord(dict(row), i, f"{label}[{i}]")
