"""Writing files so that a reader never sees half of one: the one atomic text writer.

It imports nothing of stillroom, so every layer (evaluation, methods, the run folder) can use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, flushed to disk, then
    renamed into place: an interrupted write leaves the old file (or none), never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_folder_atomic(folder: Path, write) -> None:
    """Fill ``folder`` through ``write(tmp)`` (e.g. a ``save_pretrained``) into a temporary folder beside it, every
    file flushed to disk, then renamed into place: a reader sees the old folder, or the whole new one."""
    import shutil

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
