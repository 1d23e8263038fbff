"""The loop steps several players at their update ratios, checkpoints each of them, and resumes exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from stillroom.config.schema import TrainConfig
from stillroom.data.batch import ExampleSampler
from stillroom.losses import LossResult
from stillroom.train.distributed import Topology
from stillroom.train.loop import TrainJob, train
from stillroom.train.loop import Player
from helpers import interrupted_copy


@dataclass
class Rows:
    """A toy batch: inputs ``[B, 4]`` and targets ``[B, 1]``; every row is one target."""

    x: torch.Tensor
    y: torch.Tensor
    target_weight: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "Rows":
        return Rows(self.x.to(device), self.y.to(device), self.target_weight)


class Forward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Rows) -> dict:
        return {"out": self.model(batch.x)}


class SquaredError:
    """``sum over rows of (f(x) - target)^2``; the critic's target is the student's current output."""

    def __init__(self, model: torch.nn.Module, target=None):
        self.forward = Forward(model)
        self.state = torch.nn.Module()
        self.target = target
        self.after = []

    def signal(self, batch):
        return None if self.target is None else self.target(batch.x).detach()

    def loss(self, outputs, batch, signal):
        goal = batch.y if signal is None else signal
        total = (outputs["out"] - goal).pow(2).sum()
        return LossResult(total=total, count=batch.num_targets, parts={"se": float(total.detach())})

    def after_step(self, per_target, step, total_steps):
        self.after.append((step, per_target["se"]))

    def metrics(self):
        return {}


def _job(tmp_path, name, steps, *, resume=False, save_every=2):
    torch.manual_seed(0)
    student, critic = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(32, 4, generator=g)
    examples = [(x, x.sum(0, keepdim=True)) for x in xs]
    players = [Player("student", student, SquaredError(student)),
               Player("critic", critic, SquaredError(critic, target=student), updates_per_step=3)]
    tc = TrainConfig(steps=steps, micro_batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1, precision="fp32",
                     save_every=save_every, keep_checkpoints=10)
    job = TrainJob(train=tc, seed=0, run_dir=tmp_path / name, run_name=name, players=players, examples=examples,
                   collate=lambda rows: Rows(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])),
                   topology=Topology(), device=torch.device("cpu"), sampler=ExampleSampler, resume=resume,
                   log=lambda _m: None)
    return job


def test_players_update_at_their_ratios(tmp_path):
    job = _job(tmp_path, "ratio", steps=4)
    train(job)
    student, critic = job.players
    assert student.scheduler.last_epoch == 4 and critic.scheduler.last_epoch == 12  # 1:3 updates per step
    assert [s for s, _ in critic.objective.after] == [s for s in range(4) for _ in range(3)]
    rows = [json.loads(line) for line in (tmp_path / "ratio" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "critic/loss", "critic/lr", "loss/se", "critic/loss/se"} <= set(rows[0])
    ckpt = tmp_path / "ratio" / "checkpoints" / "step_000004"
    assert {p.name for p in ckpt.glob("*.safetensors")} >= {"student.safetensors", "critic.safetensors",
                                                             "student.objective.safetensors"}
    assert rows[-1]["critic/loss"] < rows[0]["critic/loss"]  # the critic learns to follow the student


def test_resume_of_several_players_reproduces_the_uninterrupted_run(tmp_path):
    train(_job(tmp_path, "full", steps=6))
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    interrupted_copy(tmp_path / "full", "resumed", at_step=2)
    train(_job(tmp_path, "resumed", steps=6, resume=True))
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert (a["loss"], a["critic/loss"]) == pytest.approx((b["loss"], b["critic/loss"]), abs=1e-7)


def test_the_final_checkpoint_is_written_while_the_caller_goes_on_and_the_next_training_waits(tmp_path, monkeypatch):
    """``final_save_in_background``: train() returns before its last checkpoint is on disk; a next training of the
    same weights (a stage after it) starts only once that checkpoint holds the weights as they were."""
    import dataclasses
    import threading

    from stillroom.train import checkpoint as ck

    go, real = threading.Event(), ck._save_deduplicated
    monkeypatch.setattr(ck, "_save_deduplicated", lambda state, path: (go.wait(30), real(state, path)))
    job = dataclasses.replace(_job(tmp_path, "first", steps=3, save_every=0), final_save_in_background=True)
    result = train(job)
    assert result.checkpoint == tmp_path / "first" / "checkpoints" / "step_000003"
    assert not (result.checkpoint / "COMPLETE").exists()  # still being written
    trained = {k: v.clone() for k, v in job.players[0].model.state_dict().items()}
    threading.Timer(0.3, go.set).start()
    train(dataclasses.replace(job, run_dir=tmp_path / "second", final_save_in_background=False))
    assert not torch.equal(job.players[0].model.weight, trained["weight"])  # the second training moved them
    weights, state = ck.load_checkpoint(result.checkpoint, ["student"])
    assert state["step"] == 3
    for name, value in trained.items():
        assert torch.equal(weights["student"][name], value)
