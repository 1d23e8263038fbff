"""FSDP2 helpers (stillroom.train.fsdp) in one gloo process: gathering whole state and cutting it back into
shards round-trips, tied weights stay one tensor, a model gathered for good saves plain tensors (the private
FSDP2 hook handles it removes still exist); and the refusals before step 0."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers import tiny_llama
from stillroom.config.schema import LoraConfig, TrainConfig
from stillroom.domains.lm.forward import StudentForward
from stillroom.models.lora import apply_lora
from stillroom.train import fsdp


@pytest.fixture
def group(tmp_path):
    """A one-process gloo group (FSDP2 needs a mesh); destroyed after the test."""
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_student(seed: int = 0):
    model = tiny_llama(320, layers=2, seed=seed)
    forward = StudentForward(model, fused=True, hidden_layers=[], vocab=320)
    fsdp.shard(forward, model, fsdp.mesh_for(torch.device("cpu"), 1), what="student")
    return model, forward


def test_gather_and_shard_round_trip(group):
    reference = tiny_llama(320, layers=2, seed=0).state_dict()
    model, forward = _sharded_student()
    state = model.state_dict(keep_vars=True)
    assert isinstance(state["model.layers.0.mlp.up_proj.weight"], DTensor)
    whole = fsdp.gather_full(state, keep=True)
    assert set(whole) == set(reference)
    for name, tensor in reference.items():
        assert type(whole[name]) is torch.Tensor and torch.equal(whole[name], tensor), name
    assert whole["lm_head.weight"] is whole["model.embed_tokens.weight"]  # tied: stored once by the checkpoint
    assert fsdp.gather_full(state, keep=False)["lm_head.weight"] is None

    other, _ = _sharded_student(seed=1)
    fsdp.load_model_state(other, whole)
    again = fsdp.gather_full(other.state_dict(keep_vars=True), keep=True)
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_optimizer_state_round_trip(group):
    model, forward = _sharded_student()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward(SimpleNamespace(model_inputs=lambda: {"input_ids": torch.tensor([[1, 2, 3]])}))["hidden"].sum().backward()
    opt.step()
    whole = fsdp.gather_full(opt.state_dict(), keep=True)
    exp_avg = whole["state"][0]["exp_avg"]
    assert type(exp_avg) is torch.Tensor and exp_avg.shape == model.model.embed_tokens.weight.shape
    cut = fsdp.shard_optimizer_state(whole, opt)
    assert isinstance(cut["state"][0]["exp_avg"], DTensor) and not isinstance(cut["state"][0]["step"], DTensor)
    opt.load_state_dict(cut)
    with pytest.raises(ValueError, match="another model"):
        fsdp.shard_optimizer_state({**whole, "param_groups": whole["param_groups"][:0]}, opt)


def test_gathered_for_good_saves_plain_tensors(group):
    model, forward = _sharded_student()
    ids = torch.tensor([[5, 6, 7, 8]])
    forward(SimpleNamespace(model_inputs=lambda: {"input_ids": ids}))  # lazy init happens in the first forward
    with fsdp.gathered(forward):
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)  # resharded after
    fsdp.gather_for_good(forward)
    assert not any(getattr(m, "_is_fsdp_managed_module", False) for m in forward.modules())  # generate: no sync
    state = model.state_dict()  # FSDP2 would reshard here, were its hooks still in place
    assert all(type(t) is torch.Tensor for t in state.values())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, tiny_llama(320, layers=2, seed=0)(input_ids=ids).logits)


def test_shard_teacher_needs_fsdp():
    with pytest.raises(ValueError, match="train.parallel=fsdp"):
        TrainConfig(shard_teacher=True)
    assert TrainConfig(parallel="fsdp", shard_teacher=True).shard_teacher


def _player(model, name="student", teacher=None, state=None):
    forward = StudentForward(model, fused=False, hidden_layers=[], vocab=320)
    objective = SimpleNamespace(forward=forward, state=state or torch.nn.Module(), teacher=teacher)
    return SimpleNamespace(name=name, model=model, objective=objective)


@pytest.mark.parametrize("case,match", [
    ("two players", "shards one player"),
    ("lora", "LoRA"),
    ("learned loss", "learned parameters"),
    ("store teacher", "teacher.source=online"),
])
def test_refusals_before_any_sharding(case, match):
    model = tiny_llama(320, layers=2)
    players = [_player(model)]
    if case == "two players":
        players.append(_player(tiny_llama(320, layers=2), name="critic"))
    if case == "lora":
        players = [_player(apply_lora(model, LoraConfig(r=2, alpha=4)))]
    if case == "learned loss":
        players = [_player(model, state=torch.nn.Linear(1, 1))]
    if case == "store teacher":
        players = [_player(model, teacher=object())]
    train = TrainConfig(parallel="fsdp", shard_teacher=case == "store teacher")
    with pytest.raises(ValueError, match=match):
        fsdp.sharded_roots(players, train, torch.device("cpu"), world_size=2)


def test_a_baseline_beside_a_sharded_student_is_refused_before_any_model_loads(monkeypatch):
    import stillroom
    from stillroom.config.load import ConfigError, load_config
    from stillroom.run.checks import check_run

    cfg = load_config(Path(stillroom.__file__).parent / "recipes" / "quickstart.yaml", ["train.parallel=fsdp"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="baseline: true with train.parallel=fsdp under several processes"):
        check_run(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: FSDP is a no-op, the baseline trains as usual
    check_run(cfg)
