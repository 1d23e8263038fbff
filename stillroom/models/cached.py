"""Models built once into a cache folder (a teacher trained here, an SSL encoder, an MAE teacher).

:func:`build_once` makes ``folder`` appear complete or not at all: process 0 builds into a fresh
temporary folder beside it (``.tmp-<name>-<pid>``) and renames it into place; the other processes wait
at a barrier. A killed build leaves only its temporary folder, which the next build removes once its
process is gone; when two runs build the same folder, the first rename wins and the other's copy is
dropped (the folder's name is a hash of everything that decides its contents, so both are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def settings_key(payload: Any) -> str:
    """The cache folder's name for ``payload`` (JSON-serialisable: every setting that decides the folder's contents):
    16 hex digits of the SHA-256 of its key-sorted JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_once(folder: Path, *, complete: Callable[[Path], bool], build: Callable[[Path], None],
               topology: Any) -> bool:
    """``build(tmp)`` writes the folder's files into ``tmp`` when ``folder`` is not ``complete`` (process 0
    only); returns whether this process built it."""
    built = False
    if not complete(folder) and topology.is_main:
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".tmp-{folder.name}-*"):
            if not _alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another run put the same folder there first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        built = True
    topology.barrier()
    return built


def _alive(pid: str) -> bool:
    """Whether process ``pid`` still runs (a temporary folder of a live build is not stale)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
