"""Topology: each rank binds its own GPU, collectives run on the topology's device, resolve_device.

The CPU tests stand in for torchrun with a mocked environment (WORLD_SIZE / RANK / LOCAL_RANK)
and fake ``torch.distributed`` / ``torch.cuda`` functions that record what they are given:
NCCL refuses CPU tensors, so the device of the tensor reaching ``all_reduce`` is the point.
The ``gpu`` tests run the same paths on a real NCCL group (one rank) when a GPU is present.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import pytest

from stillroom.train.distributed import Topology, init_topology, resolve_device, shutdown


class FakeGroup:
    """Records the calls init_topology makes; rank/world from the mocked torchrun environment."""

    def __init__(self, monkeypatch, *, world: int, rank: int, local_rank: int, gpus: int = 0):
        self.calls: list[tuple] = []
        self.up = False
        for key, value in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": local_rank}.items():
            monkeypatch.setenv(key, str(value))
        monkeypatch.setattr(dist, "is_initialized", lambda: self.up)
        monkeypatch.setattr(dist, "init_process_group", self.init)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.calls.append(("set_device", torch.device(d))))

    def init(self, backend=None, **kw):
        self.calls.append(("init_process_group", backend))
        self.up = True


class Recorded(Exception):
    """Raised by the fake collectives once they have recorded their tensor (a meta tensor has no value)."""


def recording_collectives(monkeypatch) -> list[tuple]:
    seen: list[tuple] = []

    def all_reduce(t, op=None, **kw):
        seen.append(("all_reduce", t.device, t.dtype, op))
        raise Recorded

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda **kw: seen.append(("barrier", kw)))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src=0, **kw: seen.append(("broadcast", kw)))
    return seen


# ---------------------------------------------------------------- CPU: mocked torchrun


def test_nccl_rank_binds_the_gpu_of_its_local_rank_before_the_group_starts(monkeypatch):
    group = FakeGroup(monkeypatch, world=4, rank=3, local_rank=1, gpus=2)  # 2 nodes x 2 GPUs, second node
    topo = init_topology("cuda")
    assert group.calls == [("set_device", torch.device("cuda:1")), ("init_process_group", "nccl")]
    assert (topo.rank, topo.world_size, topo.local_rank) == (3, 4, 1)
    assert topo.device == torch.device("cuda:1") and topo.backend == "nccl" and topo.enabled


def test_gloo_rank_stays_on_the_cpu(monkeypatch):
    group = FakeGroup(monkeypatch, world=2, rank=1, local_rank=1)
    topo = init_topology("cpu")
    assert group.calls == [("init_process_group", "gloo")]  # no set_device
    assert topo.device == torch.device("cpu") and topo.backend == "gloo"


def test_a_rank_beyond_the_visible_gpus_is_an_error(monkeypatch):
    FakeGroup(monkeypatch, world=4, rank=3, local_rank=3, gpus=2)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3.*2 visible CUDA device"):
        init_topology("cuda")


def test_collectives_put_their_tensor_on_the_topology_device(monkeypatch):
    seen = recording_collectives(monkeypatch)
    # meta stands in for cuda:<local_rank> (no GPU here); the point is that the tensor goes to topo.device
    topo = Topology(rank=1, world_size=2, local_rank=1, device=torch.device("meta"), backend="nccl")
    with pytest.raises(Recorded):
        topo.all_reduce_sum(2.5)
    with pytest.raises(Recorded):
        topo.all_reduce_max(2.5)
    assert seen == [("all_reduce", torch.device("meta"), torch.float64, dist.ReduceOp.SUM),
                    ("all_reduce", torch.device("meta"), torch.float64, dist.ReduceOp.MAX)]


def test_nccl_barrier_and_broadcast_name_the_ranks_gpu(monkeypatch):
    seen = recording_collectives(monkeypatch)
    topo = Topology(rank=0, world_size=2, local_rank=1, device=torch.device("cuda:1"), backend="nccl")
    topo.barrier()
    assert topo.broadcast_object({"a": 1}) == {"a": 1}
    assert seen == [("barrier", {"device_ids": [1]}), ("broadcast", {"device": torch.device("cuda:1")})]


def test_gloo_collectives_reduce_on_the_cpu(monkeypatch):
    seen = []

    def all_reduce(t, op=None, **kw):  # two ranks: this one and one that holds 4.0
        seen.append(t.device)
        t.copy_(t + 4.0 if op == dist.ReduceOp.SUM else torch.clamp(t, min=4.0))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    topo = Topology(rank=0, world_size=2)
    assert topo.device == torch.device("cpu")
    assert topo.all_reduce_sum(1.5) == 5.5 and topo.all_reduce_max(1.5) == 4.0
    assert seen == [torch.device("cpu")] * 2


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective for one process"))
    topo = init_topology("cuda")
    assert not topo.enabled and topo.is_main and topo.device == torch.device("cpu")
    assert topo.all_reduce_sum(3.0) == 3.0 and topo.broadcast_object(7) == 7
    topo.barrier()
    shutdown(topo)


def test_resolve_device_under_torchrun_gives_each_rank_its_gpu(monkeypatch):
    FakeGroup(monkeypatch, world=2, rank=1, local_rank=1, gpus=2)
    topo = init_topology("cuda")
    assert resolve_device("cuda", topo) == torch.device("cuda:1")
    assert resolve_device("cpu", topo) == torch.device("cpu")
    # a gloo group (device cpu) with a CUDA setting still maps LOCAL_RANK to a GPU
    assert resolve_device("cuda", Topology(rank=1, world_size=2, local_rank=1)) == torch.device("cuda:1")


def test_resolve_device_refuses_one_named_gpu_for_several_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    topo = Topology(rank=0, world_size=2, local_rank=0)
    with pytest.raises(ValueError, match=r"train\.device: 'cuda:3' names one device, but 2 processes"):
        resolve_device("cuda:3", topo)
    with pytest.raises(ValueError, match=r"teacher\.device: 'cuda:0'"):
        resolve_device("cuda:0", topo, name="teacher.device")


def test_resolve_device_for_one_process_keeps_the_setting():
    one = Topology()
    assert resolve_device("cpu", one) == torch.device("cpu")
    assert resolve_device("cuda", one) == torch.device("cuda")
    assert resolve_device("cuda:3", one) == torch.device("cuda:3")
    with pytest.raises(ValueError, match=r"train\.device: 'gpu0' is not a device"):
        resolve_device("gpu0", one)


def test_bad_local_rank_is_named(monkeypatch):
    FakeGroup(monkeypatch, world=2, rank=0, local_rank=0, gpus=2)
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match="LOCAL_RANK='first'"):
        init_topology("cuda")


# ---------------------------------------------------------------- CUDA: the same paths for real


@pytest.fixture
def nccl_group(monkeypatch, tmp_path):
    """A real one-rank NCCL group behind a torchrun environment that claims two ranks (one GPU suffices):
    the collectives really run through NCCL, and a CPU tensor would be refused."""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    real_init = dist.init_process_group
    store = dist.FileStore(str(tmp_path / "store"), 1)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend=None, **kw: real_init(backend=backend, store=store, rank=0, world_size=1))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)  # the Topology believes in a second rank
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.gpu
def test_cuda_nccl_collectives_run_on_the_ranks_gpu(nccl_group):
    topo = init_topology("cuda")
    assert topo.device == torch.device("cuda:0") and topo.backend == "nccl"
    assert torch.cuda.current_device() == 0
    assert topo.all_reduce_sum(2.5) == 2.5  # one real rank: the sum is the value itself
    assert topo.all_reduce_max(-1.0) == -1.0
    topo.barrier()
    assert topo.broadcast_object({"step": 3}) == {"step": 3}


@pytest.mark.gpu
def test_cuda_resolve_device_gives_a_usable_gpu(nccl_group):
    topo = init_topology("cuda")
    device = resolve_device("cuda", topo)
    assert device == torch.device("cuda:0")
    x = torch.ones(2, device=device)
    assert x.device == device and float(x.sum()) == 2.0

