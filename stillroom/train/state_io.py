"""Save nested training state (optimizer, scheduler, RNG, ...) without pickle.

A state tree of dicts, lists, tuples, scalars and tensors is split into a JSON
skeleton and a flat ``{key: tensor}`` map stored with safetensors. Loading never
unpickles anything, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):
            return {_INTKEYS: {str(k): flatten(v, tensors, prefix) for k, v in obj.items()}}
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"state key {k!r} is neither str nor int")
        return {k: flatten(v, tensors, prefix) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(f"cannot store object of type {type(obj).__name__} in a checkpoint")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(unflatten(v, tensors) for v in obj[_TUPLE])
        if _INTKEYS in obj:
            return {int(k): unflatten(v, tensors) for k, v in obj[_INTKEYS].items()}
        if "__float__" in obj and len(obj) == 1:
            return float(obj["__float__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def save_state(state: dict, folder: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str) -> dict:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    skeleton = json.loads((folder / f"{name}.json").read_text())
    return unflatten(skeleton, tensors)
