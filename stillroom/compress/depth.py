"""Depth pruning: which decoder layers to keep, by three strategies, and the pruned model.

* ``angular`` (Gromov et al. 2024): drop the contiguous block of ``n = L - k`` layers whose input and
  output hidden states are nearest in angle (:func:`stillroom.models.derive.select_layers`, which keeps
  the first and the last layer).
* ``block_influence`` (ShortGPT, Men et al. 2024): per layer ``l``,

      BI_l = 1 - mean over calibration tokens of cos(h_l, h_{l+1})

  with ``h_l`` the layer's input and ``h_{l+1}`` its output (before the final norm); the ``n`` layers
  of lowest BI are dropped (any layers, not necessarily contiguous; ties: the later layer goes first).
* ``last_n``: drop the last ``n`` layers (the naive baseline of Gromov et al.).

The pruned model is built by :func:`stillroom.models.derive.derive_student` (a deep copy in fp32 with
the kept layers renumbered), so it saves as an ordinary Hugging Face folder.
"""

from __future__ import annotations

import torch
from torch import nn

from stillroom.config.core import LayerSelection
from stillroom.config.prune import DepthPrune
from stillroom.models.derive import decoder_layers, derive_student, layer_boundary_states, select_layers


class PruneTargetError(ValueError):
    """A pruning target the loaded model cannot meet (the message names the key and the model's value)."""


def check_depth(model: nn.Module, cfg: DepthPrune) -> None:
    """Refuse ``prune.depth.num_layers`` the model cannot keep, before any work."""
    num = len(decoder_layers(model))
    if cfg.num_layers > num:
        raise PruneTargetError(f"prune.depth.num_layers={cfg.num_layers} but the model has {num} decoder layers; "
                               f"keep at most {num}")
    if cfg.strategy == "angular" and cfg.num_layers < min(2, num):
        raise PruneTargetError(f"prune.depth.num_layers={cfg.num_layers}: strategy angular keeps the first and the "
                               "last layer, so it needs >= 2; use strategy block_influence or last_n")


@torch.no_grad()
def block_influence(model: nn.Module, calibration: list[torch.Tensor]) -> list[float]:
    """``BI[l]`` for every layer (length ``L``): 1 - mean cosine between layer ``l``'s input and output
    over all calibration tokens (``calibration``: input_ids [B, T] each), cosines in float64."""
    num = len(decoder_layers(model))
    sums = torch.zeros(num, dtype=torch.float64)
    count = 0
    for hs in layer_boundary_states(model, calibration):
        for l in range(num):
            a, b = hs[l].to(torch.float64), hs[l + 1].to(torch.float64)
            sums[l] += nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).sum().cpu()
        count += hs[0].shape[0]
    return (1.0 - sums / count).tolist()


def layers_to_keep(model: nn.Module, cfg: DepthPrune, calibration: list[torch.Tensor] | None) -> tuple[list[int], dict]:
    """Ascending indices of the kept layers and the scores behind the choice (for the report)."""
    check_depth(model, cfg)
    num, k = len(decoder_layers(model)), cfg.num_layers
    if cfg.strategy == "last_n":
        return list(range(k)), {}
    if not calibration:
        raise PruneTargetError(f"prune.depth.strategy={cfg.strategy} needs calibration batches")
    if cfg.strategy == "angular":
        keep = select_layers(model, LayerSelection(strategy="angular", num_layers=k), calibration)
        return keep, {}
    scores = block_influence(model, calibration)
    dropped = sorted(range(num), key=lambda l: (scores[l], -l))[: num - k]
    return [l for l in range(num) if l not in dropped], {"block_influence": scores}


def prune_depth(model: nn.Module, cfg: DepthPrune, calibration: list[torch.Tensor] | None) -> tuple[nn.Module, list[int], dict]:
    """A new fp32 model keeping ``cfg.num_layers`` layers; returns ``(model, kept layer indices, scores)``."""
    keep, scores = layers_to_keep(model, cfg, calibration)
    pruned, kept = derive_student(model, LayerSelection(strategy="explicit", layers=keep))
    return pruned, kept, scores
