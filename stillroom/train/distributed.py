"""Multi-process data parallel from the environment that torchrun / accelerate set.

``torchrun --standalone --nproc_per_node 2 -m stillroom.cli.main run ...`` or
``accelerate launch --multi_gpu --num_processes 2 -m stillroom.cli.main run ...``
both export RANK / WORLD_SIZE / LOCAL_RANK. With ``train.device: cuda`` the processes
talk over NCCL and process ``LOCAL_RANK`` uses GPU ``cuda:<LOCAL_RANK>`` of its node
(:func:`resolve_device`); on CPU the gloo backend is used.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def _cpu() -> torch.device:
    return torch.device("cpu")


@dataclass
class Topology:
    """This process's place among the workers, and the device its collectives run on.

    ``device`` is where the tensors of :meth:`all_reduce_sum` / :meth:`all_reduce_max` live:
    NCCL only reduces CUDA tensors, so an ``nccl`` topology holds ``cuda:<local_rank>``;
    gloo (and a single process) the CPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)
    backend: str | None = None  # "nccl" / "gloo" once a process group is up; None for a single process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _reduce(self, value: float, op) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_reduce_sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def all_reduce_max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the processes, in one flat all-reduce.

        For trainable parameters outside the DDP-wrapped forward module (a loss term's learned projection):
        DDP averages only its own module's gradients, so without this each process would train its own copy.
        A parameter without a gradient here counts as a zero gradient (every process then holds one)."""
        if not self.enabled or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])  # NCCL: no guessing which GPU this rank owns
        else:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def backend_for(device: str) -> str:
    """The process-group backend for a ``train.device`` setting: NCCL for CUDA, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _local_rank() -> int:
    raw = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={raw!r} is not an integer (torchrun / accelerate set it per process)") from None


def _cuda_device(local_rank: int, setting: str) -> torch.device:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"train.device: {setting!r} with LOCAL_RANK={local_rank}, but this node has {count} visible CUDA "
            f"device(s); start at most {count} processes per node (torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_topology(device: str) -> Topology:
    """Join the process group that torchrun / accelerate describe in the environment (a no-op for one process).

    With a CUDA ``device`` each process binds ``cuda:<LOCAL_RANK>`` (``torch.cuda.set_device``) before
    the NCCL group starts; otherwise the group uses gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Topology()
    local_rank = _local_rank()
    # A group someone else started (accelerate) keeps its backend; it may read "cpu:gloo,cuda:nccl".
    backend = str(dist.get_backend()) if dist.is_initialized() else backend_for(device)
    coll_device = _cpu()
    if "nccl" in backend:
        coll_device = _cuda_device(local_rank, device)
        torch.cuda.set_device(coll_device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Topology(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=coll_device, backend=backend)


def resolve_device(setting: str, topology: Topology, *, name: str = "train.device") -> torch.device:
    """The device this process computes on, from a device setting and the topology.

    ``cpu`` stays the CPU. ``cuda`` means this process's GPU: ``cuda:<local_rank>`` when several
    processes run (so each rank gets its own GPU), plain ``cuda`` (the current device) for one.
    An explicit index (``cuda:3``) is kept for a single process but refused for several, since every
    rank would then compute on the same GPU. ``name`` is the setting's name, for the errors.
    """
    try:
        dev = torch.device(setting)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {setting!r} is not a device ({err}); use e.g. cpu, cuda or cuda:0") from None
    if not topology.enabled:
        return dev
    if dev.index is not None:
        raise ValueError(
            f"{name}: {setting!r} names one device, but {topology.world_size} processes are running, so every "
            f"process would use it; set {name}: {dev.type} and each process takes {dev.type}:<LOCAL_RANK>"
        )
    if dev.type == "cuda":
        if topology.device.type == "cuda" and topology.device.index is not None:
            return topology.device
        return _cuda_device(topology.local_rank, setting)
    return dev


@contextlib.contextmanager
def no_sync(forward: torch.nn.Module) -> Iterator[None]:
    """Keep the gradients of the backward passes inside local, accumulated but not reduced over the processes
    (the non-final micro-batches of gradient accumulation): DDP's ``no_sync``, or FSDP2's
    ``set_requires_gradient_sync(False)`` (``train.parallel: fsdp``, :mod:`stillroom.train.fsdp`)."""
    if not isinstance(forward, FSDPModule):
        with forward.no_sync():
            yield
        return
    forward.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        forward.set_requires_gradient_sync(True)


def shutdown(topology: Topology) -> None:
    """End workers cleanly: barrier, destroy the group (avoids aborts at exit on CPU)."""
    if topology.enabled and dist.is_initialized():
        topology.barrier()
        dist.destroy_process_group()
