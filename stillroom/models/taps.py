"""Feature taps: named intermediate activations of any ``nn.Module``, from forward hooks.

``FeatureTap(model, names)`` hooks the submodules ``names`` name and, per forward, returns
``{name: activation}``: the module's output (a tuple output, as some Hugging Face blocks give, keeps
its first element: the hidden state). A name is a ``named_modules()`` name or a friendly alias:

* ``block.i``: the i-th transformer block (0-based) of a Hugging Face model: a ViT / ViTMAE encoder
  layer, a causal LM's decoder layer (``model.layers.i``). Block i's output is the LM's
  ``output_hidden_states[i + 1]``, except for the last block of models whose last hidden state has
  the final norm applied (Llama-style);
* ``stage.i``: the i-th stage of a ResNet / ConvNext (``encoder.stages.i``, maps ``[B, C, H, W]``), or
  of MobileViT (``encoder.layer.i``);
* ``layer.i``: the i-th ``Linear`` / ``Conv2d`` of a stillroom MLP / CNN (its output, before the ReLU).

:meth:`FeatureTap.truncated` runs the model only as far as it must: the forward is stopped (a private
exception raised from the hook, caught here) as soon as every tapped module has produced its output,
so a teacher aligned at block L never runs the blocks after L, nor its head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

BLOCK_LISTS = ("encoder.layer", "model.layers", "layers", "transformer.h", "encoder.layers", "blocks")
"""``named_modules()`` name endings of the ``nn.ModuleList`` whose entries ``block.i`` names (first match)."""
STAGE_LISTS = ("encoder.stages", "encoder.layer")
"""The same for ``stage.i``."""


class _StopForward(Exception):
    """Raised from a hook to end a truncated forward once every tap has fired."""


def resolve_tap(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """``(named_modules() name, module)`` of a tap name or alias (see the module docstring); a name that
    matches nothing is refused with the aliases and a few module names that would."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return name, modules[name]
    alias = re.fullmatch(r"(block|stage|layer)\.(\d+)", name)
    if alias:
        kind, index = alias.group(1), int(alias.group(2))
        entries = _layer_entries(modules) if kind == "layer" else _list_entries(modules, kind)
        if index < len(entries):
            return entries[index]
        if entries:
            raise ValueError(f"tap {name!r}: the model has {len(entries)} {kind}s ({kind}.0 .. {kind}."
                             f"{len(entries) - 1})")
    examples = ", ".join(list(modules)[1:6])
    raise ValueError(f"tap {name!r} names no submodule of {type(model).__name__}: give a named_modules() name "
                     f"(e.g. {examples}) or an alias block.i / stage.i / layer.i the model has")


def _list_entries(modules: dict[str, nn.Module], kind: str) -> list[tuple[str, nn.Module]]:
    """The entries of the first ``nn.ModuleList`` whose name ends with one of ``BLOCK_LISTS`` / ``STAGE_LISTS``."""
    for ending in BLOCK_LISTS if kind == "block" else STAGE_LISTS:
        for prefix, module in modules.items():
            if isinstance(module, nn.ModuleList) and (prefix == ending or prefix.endswith("." + ending)):
                return [(f"{prefix}.{i}", m) for i, m in enumerate(module)]
    return []


def _layer_entries(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The ``Linear`` / ``Conv2d`` modules in a stillroom classifier's ``layers`` Sequential, in order."""
    return [(n, m) for n, m in modules.items()
            if re.fullmatch(r"(.+\.)?layers\.\d+", n) and isinstance(m, (nn.Linear, nn.Conv2d))]


def _hidden(output: Any) -> torch.Tensor:
    """A module's output as one tensor: a tuple's (or ModelOutput's) first element, the hidden state."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"a tapped module returned {type(output).__name__}, not a tensor or a tuple of tensors")


class FeatureTap:
    """Forward hooks on ``names`` of ``model``; ``tap(*args, **kwargs)`` runs the model and returns
    ``{name: activation}`` (activations keep their graph: a student trains through them; wrap a teacher's
    call in ``torch.no_grad()``). Use as a context manager, or call :meth:`close`, to remove the hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        if not names:
            raise ValueError("FeatureTap needs at least one tap name")
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.modules = {name: resolve_tap(model, name)[1] for name in self.names}
        self.activations: dict[str, torch.Tensor] = {}
        self._stop = False
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.activations[name] = _hidden(output)
            if self._stop and len(self.activations) == len(self.names):
                raise _StopForward

        return record

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The model's full forward on ``args``/``kwargs``; the taps of that forward."""
        self.activations = {}
        self.model(*args, **kwargs)
        return self._taps()

    def truncated(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The taps of a forward stopped right after the last tapped module ran (the model's output and the
        modules after it are never computed)."""
        self.activations, self._stop = {}, True
        try:
            self.model(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            self._stop = False
        return self._taps()

    def _taps(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.names if n not in self.activations]
        if missing:
            raise RuntimeError(f"taps {missing} did not run in this forward of {type(self.model).__name__}")
        out, self.activations = {n: self.activations[n] for n in self.names}, {}
        return out

    def close(self) -> None:
        """Remove the hooks (the model runs as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()
