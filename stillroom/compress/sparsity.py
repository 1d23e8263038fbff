"""One-shot sparsity pruners of linear layers: magnitude, Wanda, SparseGPT; unstructured or N:M (docs/methods/
sparsity.md; ``prune.sparsity``, :class:`stillroom.config.sparsity.SparsityPrune`).

Every pruner scores the weights of each chosen ``nn.Linear`` (``W``: ``[out, in]``) and zeroes the lowest:

* magnitude: score ``|W_ij|``, ranked over the whole matrix (``magnitude_scope: layer``) or per output row;
* Wanda: score ``|W_ij| * ||X_j||_2`` (``X_j``: input feature j over every calibration token), ranked within
  each output row (Wanda's comparison group);
* SparseGPT: :mod:`stillroom.compress.sparsegpt` (the OBS solver, which also updates the kept weights).

N:M zeroes the ``M - N`` lowest scores in each group of ``M`` consecutive input weights of every row.
Wanda and SparseGPT read the layers' inputs on calibration batches, decoder layer by decoder layer: the
statistics of layer ``l``'s linears come from a forward through layers ``0..l`` that are already pruned
(truncated after layer ``l``), as the official code's sequential pass does. Every setting is checked
(modules found, N:M divisibility, calibration present) before any weight changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from stillroom.compress.sparsegpt import sparsegpt_prune
from stillroom.config.sparsity import SparsityPrune
from stillroom.models.derive import LayerSelectionError, decoder_layers


def chosen_linears(model: nn.Module, modules: list[str], *, where: str) -> dict[str, nn.Linear]:
    """``{name: linear}`` for every ``nn.Linear`` whose name is one of ``modules`` or ends with ``.<entry>``;
    refuses a list that matches nothing (``where`` names the setting in the error)."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(name == e or name.endswith("." + e) for e in modules)}
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"{where}={modules} matches no linear layer of {type(model).__name__}; its linear layers "
                         f"are named {linears}")
    return found


@dataclass
class Target:
    """One linear layer to prune and its goal: ``fraction`` (unstructured) or ``n_m``."""

    name: str
    linear: nn.Linear
    fraction: float | None
    n_m: tuple[int, int] | None


def plan_targets(model: nn.Module, cfg: SparsityPrune) -> list[Target]:
    """The chosen layers with their per-layer goals; every impossible setting is refused here."""
    linears = chosen_linears(model, cfg.modules, where="prune.sparsity.modules")
    for pattern in cfg.per_layer:
        if not any(re.search(pattern, name) for name in linears):
            raise ValueError(f"prune.sparsity.per_layer: {pattern!r} matches none of the chosen layers "
                             f"(e.g. {next(iter(linears))}); fix the regex or drop the entry")
    targets = []
    for name, linear in linears.items():
        if cfg.n_m is not None and linear.in_features % cfg.n_m[1]:
            raise ValueError(f"prune.sparsity.n_m={list(cfg.n_m)}: module {name} has weight shape "
                             f"{list(linear.weight.shape)}; its input dimension {linear.in_features} is not "
                             f"divisible by M={cfg.n_m[1]}; leave it out of prune.sparsity.modules")
        fraction = next((f for p, f in cfg.per_layer.items() if re.search(p, name)), cfg.fraction)
        targets.append(Target(name, linear, fraction, cfg.n_m))
    return targets


# ---------------------------------------------------------------- masks from scores

def prune_mask(score_oi: torch.Tensor, target: Target, *, per_row: bool) -> torch.Tensor:
    """True at the weights to zero (``[out, in]``): the lowest scores per row, over the whole matrix, or per
    N:M group."""
    out, cols = score_oi.shape
    if target.n_m is not None:
        n, m = target.n_m
        groups_ogm = score_oi.reshape(out, cols // m, m)
        drop = torch.topk(groups_ogm, m - n, dim=2, largest=False).indices
        return torch.zeros_like(groups_ogm, dtype=torch.bool).scatter_(2, drop, True).reshape(out, cols)
    if per_row:
        k = int(round(target.fraction * cols))
        drop = torch.topk(score_oi, k, dim=1, largest=False).indices
        return torch.zeros_like(score_oi, dtype=torch.bool).scatter_(1, drop, True)
    k = int(round(target.fraction * score_oi.numel()))
    mask = torch.zeros(score_oi.numel(), dtype=torch.bool, device=score_oi.device)
    mask[torch.topk(score_oi.flatten(), k, largest=False).indices] = True
    return mask.view_as(score_oi)


class InputStats:
    """Running statistics of one linear layer's inputs (``[tokens, in]`` per call), in float32.

    ``sumsq_i``: Wanda's ``sum_t x_tj^2``; ``hessian_ii``: SparseGPT's ``sum_t x_t x_t^T / tokens``."""

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.tokens = 0
        self.sumsq_i = torch.zeros(in_features, device=device)
        self.hessian_ii = torch.zeros(in_features, in_features, device=device) if hessian else None

    def add(self, x_ti: torch.Tensor) -> None:
        x_ti = x_ti.detach().float()
        self.sumsq_i += (x_ti**2).sum(0)
        if self.hessian_ii is not None:  # a running mean keeps the scale independent of the token count
            total = self.tokens + x_ti.shape[0]
            self.hessian_ii.mul_(self.tokens / total).add_(x_ti.T @ x_ti, alpha=1.0 / total)
        self.tokens += x_ti.shape[0]


def pruned_weight(target: Target, cfg: SparsityPrune, stats: InputStats | None) -> torch.Tensor:
    """The new float32 weight ``[out, in]`` of ``target`` under ``cfg.method``."""
    weight = target.linear.weight.detach().float()
    if cfg.method == "sparsegpt":
        try:
            return sparsegpt_prune(weight, stats.hessian_ii, fraction=target.fraction, n_m=target.n_m,
                                   block_size=cfg.block_size, dampening=cfg.dampening)
        except torch.linalg.LinAlgError as e:
            raise ValueError(f"prune.sparsity (sparsegpt): the input Hessian of {target.name} is not positive "
                             f"definite after dampening {cfg.dampening}; raise prune.sparsity.dampening or give "
                             "more calibration tokens (prune.calibration)") from e
    if cfg.method == "wanda":
        score = weight.abs() * stats.sumsq_i.sqrt().reshape(1, -1)
        return weight.masked_fill(prune_mask(score, target, per_row=True), 0.0)
    mask = prune_mask(weight.abs(), target, per_row=cfg.magnitude_scope == "row")
    return weight.masked_fill(mask, 0.0)


# ---------------------------------------------------------------- calibration pass

class _StopForward(Exception):
    """Raised from a hook after the last decoder layer a pass needs."""


def _stop(*_args) -> None:
    raise _StopForward()


def _groups(model: nn.Module, targets: list[Target]) -> list[tuple[nn.Module | None, list[Target]]]:
    """Targets grouped by the decoder layer that holds them, in forward order; the rest last (``None``: run
    the whole model)."""
    try:
        layers = list(decoder_layers(model))
    except LayerSelectionError:  # a model without a decoder-layer list: one pass over the whole model
        layers = []
    owner = {id(m): layer for layer in layers for m in layer.modules()}
    groups = [(layer, [t for t in targets if owner.get(id(t.linear)) is layer]) for layer in layers]
    rest = [t for t in targets if id(t.linear) not in owner]
    return [g for g in groups if g[1]] + ([(None, rest)] if rest else [])


def _collect(model: nn.Module, last: nn.Module | None, targets: list[Target], calibration: list[torch.Tensor],
             hessian: bool) -> dict[str, InputStats]:
    """Input statistics of ``targets`` on every calibration batch, the forward stopped after ``last``."""
    device = next(model.parameters()).device
    stats = {t.name: InputStats(t.linear.in_features, device, hessian) for t in targets}
    hooks = [t.linear.register_forward_pre_hook(
        lambda _m, args, s=stats[t.name]: s.add(args[0].reshape(-1, args[0].shape[-1]))) for t in targets]
    if last is not None:
        hooks.append(last.register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for ids_bt in calibration:
                try:
                    model(input_ids=ids_bt.to(device))
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return stats


def sparsify(model: nn.Module, cfg: SparsityPrune, calibration: list[torch.Tensor] | None, *,
             log: Callable[[str], None] = print) -> list[dict]:
    """Prune ``model``'s chosen linear layers in place; one row per layer ``{"module", "numel", "zeros",
    "sparsity"}``. ``calibration``: batches of input ids ``[B, T]`` (Wanda and SparseGPT need them)."""
    targets = plan_targets(model, cfg)
    needs_data = cfg.method in ("wanda", "sparsegpt")
    if needs_data and not calibration:
        raise ValueError(f"prune.sparsity.method={cfg.method} needs calibration batches (prune.calibration); "
                         "method magnitude needs none")
    was_training = model.training
    model.eval()
    groups = _groups(model, targets) if needs_data else [(None, targets)]
    for last, group in groups:
        stats = _collect(model, last, group, calibration, cfg.method == "sparsegpt") if needs_data else {}
        for t in group:
            with torch.no_grad():
                t.linear.weight.copy_(pruned_weight(t, cfg, stats.get(t.name)).to(t.linear.weight.dtype))
    model.train(was_training)
    rows = [sparsity_row(t.name, t.linear.weight) for t in targets]
    zeros, numel = sum(r["zeros"] for r in rows), sum(r["numel"] for r in rows)
    goal = f"{cfg.n_m[0]}:{cfg.n_m[1]}" if cfg.n_m else f"{cfg.fraction:.0%}"
    log(f"sparsity: {cfg.method} {goal} on {len(rows)} linear layers; {zeros}/{numel} weights zero "
        f"({zeros / numel:.1%})")
    return rows


def sparsity_row(name: str, weight: torch.Tensor) -> dict:
    """``{"module", "numel", "zeros", "sparsity"}`` of one weight."""
    zeros = int((weight == 0).sum())
    return {"module": name, "numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
