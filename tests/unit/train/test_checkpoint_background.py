"""A checkpoint written in a thread (a run's final one) is the same checkpoint, and nobody reads it half done."""

import threading

import pytest
import torch

from stillroom.train import checkpoint as ck


def _weights(value: float) -> dict:
    return {"student": {"w": torch.full((4,), value)}, "student.objective": {}}


def _held(monkeypatch) -> threading.Event:
    """Hold every write at its first file until the returned event is set."""
    go = threading.Event()
    real = ck._save_deduplicated

    def slow(state, path):
        assert go.wait(30), "the test never let the write go on"
        real(state, path)

    monkeypatch.setattr(ck, "_save_deduplicated", slow)
    return go


def test_a_background_checkpoint_equals_a_written_one(tmp_path):
    weights = _weights(2.0)
    folder = ck.save_checkpoint(tmp_path / "a", 3, weights=weights, train_state={"step": 3, "run_id": "r"}, keep=1,
                                background=True)
    assert ck.latest_checkpoint(tmp_path / "a") == folder  # waits for the thread
    ck.save_checkpoint(tmp_path / "b", 3, weights=weights, train_state={"step": 3, "run_id": "r"}, keep=1)
    got, state = ck.load_checkpoint(folder, ["student"])
    want, want_state = ck.load_checkpoint(tmp_path / "b" / "step_000003", ["student"])
    assert torch.equal(got["student"]["w"], want["student"]["w"]) and state == want_state
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "b" / "step_000003").iterdir())
    assert not ck._pending


def test_readers_wait_for_the_write_and_others_do_not(tmp_path, monkeypatch):
    go = _held(monkeypatch)
    root, other = tmp_path / "checkpoints", tmp_path / "elsewhere"
    param = torch.nn.Parameter(torch.ones(4))
    folder = ck.save_checkpoint(root, 5, weights={"student": {"w": param}}, train_state={"step": 5}, keep=1,
                                background=True)
    ck.wait_for_writes(other)  # another folder: returns at once
    assert ck._pending and not (folder / "COMPLETE").exists()
    reader = threading.Thread(target=lambda: ck.latest_checkpoint(root))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # the reader of that folder waits for the write ...
    go.set()
    reader.join(30)
    assert not reader.is_alive() and (folder / "COMPLETE").is_file() and not ck._pending  # ... and sees it whole


def test_a_failed_background_write_raises_at_the_next_reader_and_keeps_the_last_good(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ck.save_checkpoint(root, 1, weights=_weights(1.0), train_state={"step": 1}, keep=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_state", full_disk)
    ck.save_checkpoint(root, 2, weights=_weights(2.0), train_state={"step": 2}, keep=1, background=True)
    with pytest.raises(RuntimeError, match=r"writing checkpoint .*step_000002 failed: .*No space left"):
        ck.latest_checkpoint(root)
    monkeypatch.undo()
    assert ck.latest_checkpoint(root).name == "step_000001" and not ck._pending
