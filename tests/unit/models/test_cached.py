"""build_once: a cache folder appears complete or not at all."""

from __future__ import annotations

import pytest

from stillroom.models.cached import build_once
from stillroom.train.distributed import Topology


def complete(folder):
    return (folder / "done.json").is_file()


def test_builds_once_into_a_temporary_folder_then_reuses(tmp_path):
    folder = tmp_path / "cache" / "abc"
    seen = []

    def build(tmp):
        seen.append(tmp)
        assert tmp.is_dir() and tmp.parent == folder.parent and tmp.name.startswith(".tmp-abc-")
        (tmp / "done.json").write_text("{}")

    assert build_once(folder, complete=complete, build=build, topology=Topology())
    assert complete(folder) and not seen[0].exists()
    assert not build_once(folder, complete=complete, build=build, topology=Topology()) and len(seen) == 1


def test_a_failed_build_leaves_no_folder_and_its_leftover_is_cleared_next_time(tmp_path):
    folder = tmp_path / "abc"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(folder, complete=complete, build=broken, topology=Topology())
    assert not folder.exists() and len(list(tmp_path.glob(".tmp-abc-*"))) == 1
    dead = tmp_path / ".tmp-abc-999999999"  # a temporary folder of a process that no longer runs
    dead.mkdir()
    build_once(folder, complete=complete, build=lambda tmp: (tmp / "done.json").write_text("{}"), topology=Topology())
    assert complete(folder) and not dead.exists()


def test_when_another_run_finished_first_its_folder_is_kept(tmp_path):
    folder = tmp_path / "abc"

    def racing(tmp):
        folder.mkdir()
        (folder / "done.json").write_text("theirs")
        (folder / "more").write_text("x")  # a non-empty folder: the rename cannot replace it
        (tmp / "done.json").write_text("ours")

    build_once(folder, complete=complete, build=racing, topology=Topology())
    assert (folder / "done.json").read_text() == "theirs" and not list(tmp_path.glob(".tmp-abc-*"))
