"""Checkpoints are atomic, pickle-free and restore optimizer/scheduler/RNG state exactly."""

import json
import random

import pytest
import torch

from stillroom.config.schema import TrainConfig
from stillroom.train import checkpoint as ck
from stillroom.train.loop import Player, lr_factor
from stillroom.train.state_io import load_state, save_state


class _NoState(torch.nn.Module):
    pass


class _Objective:
    state = _NoState()


def _player(model):
    player = Player("student", model, _Objective())
    player.build_optimizer(TrainConfig(steps=10, warmup_steps=2))
    return player


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    player = _player(model)
    model(torch.randn(3, 4)).sum().backward()
    player.optimizer.step()
    player.scheduler.step()
    return model, player.optimizer, player.scheduler


def test_state_roundtrip_without_pickle(tmp_path):
    model, opt, sched = _model_opt()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ck.rng_state(), "x": (1, 2.5, None)}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["x"] == (1, 2.5, None)
    opt2 = _player(model).optimizer
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        for name, t in v.items():
            torch.testing.assert_close(opt2.state_dict()["state"][k][name], t)
    # The files hold only JSON and safetensors: nothing to unpickle.
    json.loads((tmp_path / "s.json").read_text())


def test_rng_state_restores_exactly():
    state = ck.rng_state()
    a = (torch.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.gpu
def test_cuda_rng_state_restores_exactly_through_a_checkpoint(tmp_path):
    """Noise drawn on the GPU (the generative domain's) resumes exactly: the GPU generators are checkpointed."""
    torch.cuda.init()
    torch.cuda.manual_seed_all(3)
    save_state({"rng": ck.rng_state()}, tmp_path, "train_state")
    a = torch.randn(5, device="cuda")
    ck.set_rng_state(load_state(tmp_path, "train_state")["rng"])
    assert torch.equal(torch.randn(5, device="cuda"), a)


def _save(root, step, value):
    return ck.save_checkpoint(
        root, step, weights={"student": {"w": torch.full((2,), float(value))}, "student.objective": {}},
        train_state={"step": step}, keep=3
    )


def test_kill_during_save_keeps_last_good(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck, "save_state", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 2, 2.0)
    monkeypatch.undo()
    latest = ck.latest_checkpoint(root)
    assert latest.name == "step_000001"
    weights, train_state = ck.load_checkpoint(latest, ["student", "student.objective"])
    assert weights["student"]["w"][0] == 1.0 and train_state["step"] == 1
    # The next save cleans the leftover temporary folder.
    _save(root, 3, 3.0)
    assert not list(root.glob(".tmp-*"))
    assert ck.latest_checkpoint(root).name == "step_000003"


def test_stale_latest_pointer_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    (root / "step_000002" / "COMPLETE").unlink()
    assert ck.latest_checkpoint(root).name == "step_000001"


def test_keep_only_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for s in range(1, 6):
        _save(root, s, s)
    assert [p.name for p in ck.complete_checkpoints(root)] == ["step_000003", "step_000004", "step_000005"]


def test_schedule_warmup_then_cosine_floor():
    cfg = TrainConfig(steps=20, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.25)
    assert lr_factor(3, cfg) == pytest.approx(1.0)
    assert lr_factor(4, cfg) == pytest.approx(1.0)
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(4, 20))


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A checkpoint with a higher step (left by another run) used to survive pruning while the one just written
    was deleted, leaving ``latest`` pointing at a missing folder."""
    root = tmp_path / "checkpoints"
    _save(root, 4, 4.0)  # another run's leftover
    written = ck.save_checkpoint(root, 3, weights={"student": {"w": torch.full((2,), 3.0)}, "student.objective": {}},
                                 train_state={"step": 3}, keep=1)
    assert written.is_dir() and [p.name for p in ck.complete_checkpoints(root)] == ["step_000003"]
    assert (root / "latest").read_text() == "step_000003"
    assert ck.latest_checkpoint(root) == written


def test_pruning_keeps_the_newest_before_the_one_written(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 9):
        _save(root, s, s)
    ck.save_checkpoint(root, 4, weights={"student": {"w": torch.zeros(2)}, "student.objective": {}},
                       train_state={"step": 4}, keep=3)
    assert [p.name for p in ck.complete_checkpoints(root)] == ["step_000002", "step_000003", "step_000004"]
    assert ck.latest_checkpoint(root).name == "step_000004"


def test_the_run_id_is_read_from_the_json_alone(tmp_path):
    root = tmp_path / "checkpoints"
    folder = ck.save_checkpoint(root, 1, weights={"student": {"w": torch.zeros(2)}},
                                train_state={"step": 1, "run_id": "r-1"}, keep=2)
    assert ck.checkpoint_run_id(folder) == "r-1" and ck.checkpoint_step(folder) == 1
    assert ck.checkpoint_run_id(_save(root, 2, 2.0)) is None  # written without one (an older run)
