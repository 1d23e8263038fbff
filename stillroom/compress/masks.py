"""Fixed sparsity masks for sparse fine-tuning (SquareHead's setting; ``student.fixed_sparsity``).

The masks are taken once from the loaded sparse model (``mask = weight != 0`` for every chosen linear layer)
and re-applied (``weight *= mask``, no grad) after every optimizer step and after a resume restores the
optimizer state: AdamW's momentum and weight decay would otherwise move the pruned weights away from zero.
Each mask lives on its weight's device (it follows the weight once if the model moves), so applying it moves
no tensor between devices step after step.
"""

from __future__ import annotations

import torch
from torch import nn

from stillroom.compress.sparsity import chosen_linears, sparsity_row


class FixedMasks:
    """Boolean keep-masks (``[out, in]``, True = may be nonzero) of named linear layers."""

    def __init__(self, weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.masks = masks

    @classmethod
    def from_zeros(cls, model: nn.Module, modules: list[str]) -> "FixedMasks":
        """Masks of the chosen linear layers of ``model`` (names or name endings, as
        :func:`stillroom.compress.sparsity.chosen_linears`): their current nonzero pattern."""
        linears = chosen_linears(model, modules, where="student.fixed_sparsity.modules")
        weights = {name: m.weight for name, m in linears.items()}
        return cls(weights, {name: (w.detach() != 0) for name, w in weights.items()})

    @torch.no_grad()
    def apply(self) -> None:
        """Set every masked weight to zero again (idempotent). A mask follows its weight to another device
        once (the session moves the model to ``train.device`` after the masks are taken)."""
        for name, weight in self.weights.items():
            if self.masks[name].device != weight.device:
                self.masks[name] = self.masks[name].to(weight.device)
            weight.masked_fill_(~self.masks[name], 0.0)

    def summary(self) -> dict:
        """``{"numel", "zeros", "sparsity", "modules": {name: {"numel", "zeros", "sparsity"}}}`` of the weights
        as they are now (after training: the achieved sparsity of the trained model)."""
        rows = {name: sparsity_row(name, w.detach()) for name, w in self.weights.items()}
        numel = sum(r["numel"] for r in rows.values())
        zeros = sum(r["zeros"] for r in rows.values())
        per_module = {name: {k: r[k] for k in ("numel", "zeros", "sparsity")} for name, r in rows.items()}
        return {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0, "modules": per_module}

    def mask_sparsity(self) -> float:
        """The fraction of masked (held-at-zero) weights over all chosen layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total
