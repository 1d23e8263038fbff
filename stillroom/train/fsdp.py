"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student and a frozen teacher (``train.parallel: fsdp``).

What is sharded: every decoder layer is its own unit (its weights are all-gathered just before the layer runs
and freed after it), and the player's forward module (:class:`~stillroom.domains.lm.forward.StudentForward`:
embeddings, final norm, output head) is the root unit. FSDP2 keeps the root's weights gathered from its forward
to the end of the backward, so the fused loss path, which reads the output head's weight in the forward and
applies it chunk by chunk after it, multiplies by the whole gathered weight and its gradient is reduce-scattered
like any other. Gradients are averaged over the processes (as DDP does), and the optimizer holds one shard of
every state tensor per process. With ``train.shard_teacher`` the online teacher's layers and the teacher model
are sharded the same way, frozen (no gradients, nothing reduced).

Checkpoints keep their format (:mod:`stillroom.train.checkpoint`): :func:`gather_full` turns the sharded
weights and optimizer state into whole CPU tensors on process 0 (a collective: every process calls it), which
writes the same safetensors files as a one-process or DDP run; :func:`shard_like` cuts a loaded whole tensor
into this process's shard again. A checkpoint therefore resumes under ddp, fsdp or one process alike.

After training, :func:`gather_for_good` leaves every weight gathered and stops the resharding, so that process 0
alone can evaluate and save the student (``save_pretrained`` of plain tensors) without the other processes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from stillroom.models.derive import decoder_layers
from stillroom.models.errors import LayerSelectionError


def mesh_for(device: torch.device, world_size: int) -> DeviceMesh:
    """The one-dimensional mesh of all processes on ``device``'s type (cpu with gloo, cuda with NCCL)."""
    return init_device_mesh(device.type, (world_size,))


def precision_policy(precision: str) -> MixedPrecisionPolicy:
    """``train.precision: bf16``: gather the weights in bf16 for the compute, reduce the gradients in fp32 (the
    fp32 master shards stay what the optimizer updates); fp32: no casts."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(root: torch.nn.Module, model: torch.nn.Module, mesh: DeviceMesh, *, what: str,
          policy: MixedPrecisionPolicy | None = None) -> None:
    """``fully_shard`` each decoder layer of ``model`` and then ``root`` (``model`` itself or a module holding it),
    in place. ``what`` names the model in the error for one without decoder layers. The root of a trained model
    keeps its weights gathered from forward to backward (FSDP2's default); a frozen one (no trainable weight: a
    teacher) has no backward, so it reshards after each forward like its layers."""
    try:
        layers = decoder_layers(model)
    except LayerSelectionError:
        raise ValueError(f"train.parallel=fsdp shards a model by its decoder layers, but the {what} "
                         f"({type(model).__name__}) has none stillroom can find; use train.parallel=ddp") from None
    policy = policy or MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=None if _trained(root) else True)


def _trained(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _fsdp_modules(root: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def _gather_all(root: torch.nn.Module) -> None:
    root.set_reshard_after_forward(False)
    for module in _fsdp_modules(root):
        module.unshard()


@contextlib.contextmanager
def gathered(root: torch.nn.Module) -> Iterator[None]:
    """Every weight under the sharded ``root`` whole on every process for the duration (periodic evaluation
    calls the model directly, past the root's forward, on process 0 alone); resharded after. Every process must
    enter it. The forwards inside leave FSDP2's per-iteration records (the post-forward order its backward
    prefetches by) on the evaluating process only; ``reset_iter_state`` clears them, or the next backward's
    all-gathers would differ between the processes."""
    _gather_all(root)
    try:
        yield
    finally:
        root.reset_iter_state()
        for module in _fsdp_modules(root):
            module.reshard()
        root.set_reshard_after_forward(True)
        if _trained(root):  # as :func:`shard` left it: the root keeps its weights from forward to backward
            root.set_reshard_after_forward(False, recurse=False)


def gather_for_good(root: torch.nn.Module) -> None:
    """Gather every weight under ``root`` on every process and keep it so: forwards then need no collective, so
    process 0 alone can evaluate and save the model after training. Every process must call it.

    FSDP2 reshards a module before its ``state_dict`` / ``load_state_dict`` (hooks it registers per parameter
    group); ``save_pretrained`` would then see sharded weights and wait for the other processes. Those hooks
    are removed here (torch has no public call for it; the handles are private, checked by the tests). And
    transformers' ``generate`` syncs every decoding step over the processes for a module marked FSDP-managed
    (``_is_fsdp_managed_module``, set by ``fully_shard``); the marks are cleared, nothing is managed any more."""
    _gather_all(root)
    for module in root.modules():
        module._is_fsdp_managed_module = False
    for module in _fsdp_modules(root):
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():  # removed, not forgotten: FSDP does not register them again
                    handle.remove()


def gather_full(obj: Any, keep: bool, _seen: dict[int, torch.Tensor | None] | None = None) -> Any:
    """``obj`` (a state dict, an optimizer state dict: nested dicts and lists) with every :class:`DTensor` made
    whole (``full_tensor``) and moved to the CPU, plain tensors moved to the CPU. A collective: every process
    calls it on the same structure; with ``keep=False`` (not process 0) the gathered tensors are dropped at once,
    so only process 0 holds the whole model. A tensor met twice (tied embeddings) is gathered once and stays
    one tensor, so the checkpoint stores it once as before."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            whole = obj.full_tensor() if isinstance(obj, DTensor) else obj
            seen[id(obj)] = whole.detach().cpu() if keep else None
        return seen[id(obj)]
    if isinstance(obj, dict):
        return {k: gather_full(v, keep, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v, keep, seen) for v in obj)
    return obj


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor read from a checkpoint) as this process's shard of ``like``'s layout: a
    :class:`DTensor` cut as ``like`` is (every process read the same file, so no data moves); a plain tensor
    stays as it is."""
    if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
        return full
    local = full.detach().to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def load_model_state(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict`` of a whole-tensor state dict into a (possibly sharded) ``model``."""
    current = model.state_dict()
    model.load_state_dict({k: shard_like(v, current[k]) if k in current else v for k, v in full.items()})


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict with whole tensors (as a checkpoint holds it) with every per-parameter tensor of
    a sharded parameter cut to this process's shard; scalars (Adam's ``step``) and plain parameters untouched."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(params) != len(ids):
        raise ValueError(f"the checkpoint's optimizer has {len(ids)} parameters, this run's {len(params)}: it was "
                         "written by another model or trainable setting; start a new run")
    by_id = dict(zip(ids, params))
    sharded = {i: {k: shard_like(v, by_id[i]) if torch.is_tensor(v) else v for k, v in s.items()}
               for i, s in state["state"].items()}
    return {**state, "state": sharded}


def sharded_roots(players: list, train, device: torch.device, world_size: int) -> list[torch.nn.Module]:
    """Shard the student (and with ``train.shard_teacher`` its online teacher) for ``train.parallel: fsdp``;
    returns the sharded roots. Refuses, before step 0, what FSDP2 here does not support (see the errors)."""
    from stillroom.models.lora import unwrap
    from stillroom.teachers.signal import OnlineTeacher

    if len(players) != 1:
        raise ValueError(f"train.parallel=fsdp shards one player, the student; this method trains "
                         f"{len(players)} ({', '.join(p.name for p in players)}); use train.parallel=ddp")
    player = players[0]
    forward = player.objective.forward
    if unwrap(player.model) is not player.model:
        raise ValueError("train.parallel=fsdp does not shard a wrapped (LoRA/peft) student; use train.parallel=ddp "
                         "or student.trainable=full")
    if not any(m is player.model for m in forward.modules()):
        raise ValueError(f"train.parallel=fsdp: the {player.name}'s forward module does not hold its model, so it "
                         "cannot be sharded as one; use train.parallel=ddp")
    if any(isinstance(m, FSDPModule) for m in forward.modules()):
        raise ValueError("train.parallel=fsdp: the model was sharded before (baseline: true trains a copy of the "
                         "trained student); set baseline: false, or run the baseline as a run of its own")
    if any(p.requires_grad for p in player.objective.state.parameters()):
        raise ValueError("train.parallel=fsdp: the loss has learned parameters, which FSDP would not reduce over "
                         "the processes; use train.parallel=ddp")
    teacher = getattr(player.objective, "teacher", None)
    if train.shard_teacher and not isinstance(teacher, OnlineTeacher):
        raise ValueError(f"train.shard_teacher shards an online teacher model, but this run's teacher is "
                         f"{type(teacher).__name__}; set teacher.source=online or train.shard_teacher=false")
    if train.shard_teacher and teacher.device.type != device.type:
        raise ValueError(f"train.shard_teacher: the teacher is on {teacher.device.type}, the student on "
                         f"{device.type}; put teacher.device on the student's device type")
    mesh = mesh_for(device, world_size)
    shard(forward, player.model, mesh, what="student", policy=precision_policy(train.precision))
    roots = [forward]
    if train.shard_teacher:
        shard(teacher.model, teacher.model, mesh, what="teacher")
        roots.append(teacher.model)
    return roots
