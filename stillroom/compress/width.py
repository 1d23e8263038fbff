"""Width pruning (Minitron): rank heads, MLP channels and embedding channels by their activations on
calibration data and slice the weights into a smaller model of the same depth (a smaller config, no masks).

Importance (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"), each summed over the sequence and averaged over batch rows and calibration batches:

* head ``h`` of a layer: ``sum_t || attn_out[b, t, h, :] ||_2``, the L2 norm of the head's attention
  output (the input of ``o_proj``) before the output projection;
* MLP channel ``j`` of a layer: ``sum_t | act(gate(x)) * up(x) |[b, t, j]`` (the input of ``down_proj``);
* embedding channel ``c``: ``sum_t | RMSNorm(x)[b, t, c] |`` over the outputs of every norm of every layer
  (input, post-attention) and the final norm, summed over them.

Heads are pruned per KV group (GQA): a KV group's importance is the sum of its query heads'; the top
``num_key_value_heads`` groups stay, and in each the top ``num_attention_heads / num_key_value_heads``
query heads, so every kept query head keeps its KV head and each group keeps the same number. Each layer
ranks its own heads and channels; embedding channels are one choice for the whole residual stream.
Kept indices stay in their original order. Llama-family models only (``model.layers[i].self_attn``
q/k/v/o, ``mlp`` gate/up/down, RMSNorms; Llama, Mistral, Qwen2 attention biases included).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from stillroom.compress.depth import PruneTargetError
from stillroom.config.prune import WidthPrune

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class WidthPlan:
    """What stays: per layer the kept query heads / KV heads / MLP channels, and the kept embedding channels."""

    heads: list[list[int]] = field(default_factory=list)
    kv_heads: list[list[int]] = field(default_factory=list)
    channels: list[list[int]] = field(default_factory=list)
    hidden: list[int] = field(default_factory=list)


def check_width(model: nn.Module, cfg: WidthPrune) -> None:
    """Refuse an architecture or a target the model cannot meet, naming the key and the model's value."""
    c = model.config
    if c.model_type not in SUPPORTED:
        raise PruneTargetError(f"prune.width supports Llama-family models ({', '.join(SUPPORTED)}); this model is "
                               f"{c.model_type!r} ({type(model).__name__}); use prune.depth or prune.sparsity")
    heads, groups = c.num_attention_heads, c.num_key_value_heads
    limits = {"num_attention_heads": heads, "num_key_value_heads": groups,
              "intermediate_size": c.intermediate_size, "hidden_size": c.hidden_size}
    for key, have in limits.items():
        want = getattr(cfg, key)
        if want is not None and want > have:
            raise PruneTargetError(f"prune.width.{key}={want} but the model has {key}={have}; keep at most {have}")
    kept_heads, kept_groups = _head_targets(model, cfg)
    if kept_heads % kept_groups or kept_heads // kept_groups > heads // groups:
        raise PruneTargetError(
            f"prune.width.num_attention_heads={kept_heads} over {kept_groups} KV heads: each KV head must keep the "
            f"same number of query heads, at most the model's {heads // groups} per KV head ({heads} heads, "
            f"{groups} KV heads); set prune.width.num_key_value_heads so that it divides num_attention_heads")


def _head_targets(model: nn.Module, cfg: WidthPrune) -> tuple[int, int]:
    c = model.config
    kept_heads = cfg.num_attention_heads or c.num_attention_heads
    if cfg.num_key_value_heads is not None:
        return kept_heads, cfg.num_key_value_heads
    if kept_heads % c.num_key_value_heads == 0:
        return kept_heads, c.num_key_value_heads  # every group stays
    per_group = c.num_attention_heads // c.num_key_value_heads
    return kept_heads, -(-kept_heads // per_group)  # the fewest groups that hold the kept heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def importance(model: nn.Module, calibration: list[torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """Activation importances (float64, CPU): ``heads`` per layer ``[n_heads]``, ``channels`` per layer
    ``[intermediate]``, ``hidden`` ``[hidden]`` (see the module docstring). ``calibration``: input_ids [B, T]."""
    c, layers = model.config, model.model.layers
    hd = head_dim(c)
    heads = [torch.zeros(c.num_attention_heads, dtype=torch.float64) for _ in layers]
    channels = [torch.zeros(c.intermediate_size, dtype=torch.float64) for _ in layers]
    hidden = torch.zeros(c.hidden_size, dtype=torch.float64)

    def add(acc: torch.Tensor, x_bt_k: torch.Tensor) -> None:  # sum over t, mean over b -> accumulate [k]
        acc += x_bt_k.to(torch.float64).sum(1).mean(0).cpu()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a, i=i: add(heads[i], a[0].unflatten(-1, (-1, hd)).norm(dim=-1))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: add(channels[i], a[0].abs())))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(lambda _m, _a, out: add(hidden, out.abs())))
    handles.append(model.model.norm.register_forward_hook(lambda _m, _a, out: add(hidden, out.abs())))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids_bt in calibration:
            model.model(input_ids=ids_bt.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = max(len(calibration), 1)
    return {"heads": [h / n for h in heads], "channels": [ch / n for ch in channels], "hidden": hidden / n}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ascending (ties: the lower index)."""
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def plan_width(model: nn.Module, cfg: WidthPrune, scores: dict) -> WidthPlan:
    """The kept indices for ``cfg`` from ``scores`` (:func:`importance`)."""
    c = model.config
    kept_heads, kept_groups = _head_targets(model, cfg)
    per_group, keep_per_group = c.num_attention_heads // c.num_key_value_heads, kept_heads // kept_groups
    plan = WidthPlan(hidden=_top(scores["hidden"], cfg.hidden_size or c.hidden_size))
    for head_scores, channel_scores in zip(scores["heads"], scores["channels"]):
        by_group = head_scores.view(c.num_key_value_heads, per_group)
        groups = _top(by_group.sum(1), kept_groups)
        plan.kv_heads.append(groups)
        plan.heads.append([g * per_group + j for g in groups for j in _top(by_group[g], keep_per_group)])
        plan.channels.append(_top(channel_scores, cfg.intermediate_size or c.intermediate_size))
    return plan


def _rows(size: int, kept: list[int]) -> torch.Tensor:
    """Row indices of the kept ``size``-row blocks (heads of ``head_dim`` rows)."""
    return torch.tensor([k * size + r for k in kept for r in range(size)], dtype=torch.long)


def _slice_linear(sd: dict, name: str, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> None:
    """Keep rows ``out_idx`` and columns ``in_idx`` of ``name.weight`` [out, in] (and ``out_idx`` of its bias)."""
    w = sd[f"{name}.weight"]
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if f"{name}.bias" in sd:
            sd[f"{name}.bias"] = sd[f"{name}.bias"].index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    sd[f"{name}.weight"] = w


def sliced_state(model: nn.Module, plan: WidthPlan) -> dict[str, torch.Tensor]:
    """The model's state dict (on the CPU) with every weight sliced to ``plan`` (shapes of the smaller config)."""
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}  # sliced on the CPU
    hd = head_dim(model.config)
    hid = torch.tensor(plan.hidden, dtype=torch.long)
    for name in [k for k in sd if k.endswith("embed_tokens.weight") or k == "lm_head.weight"]:
        sd[name] = sd[name].index_select(1, hid)
    for i, (heads, groups, chans) in enumerate(zip(plan.heads, plan.kv_heads, plan.channels)):
        p, ch = f"model.layers.{i}", torch.tensor(chans, dtype=torch.long)
        _slice_linear(sd, f"{p}.self_attn.q_proj", _rows(hd, heads), hid)
        _slice_linear(sd, f"{p}.self_attn.k_proj", _rows(hd, groups), hid)
        _slice_linear(sd, f"{p}.self_attn.v_proj", _rows(hd, groups), hid)
        _slice_linear(sd, f"{p}.self_attn.o_proj", hid, _rows(hd, heads))
        _slice_linear(sd, f"{p}.mlp.gate_proj", ch, hid)
        _slice_linear(sd, f"{p}.mlp.up_proj", ch, hid)
        _slice_linear(sd, f"{p}.mlp.down_proj", hid, ch)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[f"{p}.{norm}.weight"] = sd[f"{p}.{norm}.weight"].index_select(0, hid)
    sd["model.norm.weight"] = sd["model.norm.weight"].index_select(0, hid)
    return sd


def apply_width(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """A new model of the same class with the smaller config, holding the sliced weights (fp32)."""
    cfg = copy.deepcopy(model.config)
    cfg.head_dim = head_dim(model.config)  # keep the head size when hidden / heads change
    cfg.num_attention_heads, cfg.num_key_value_heads = len(plan.heads[0]), len(plan.kv_heads[0])
    cfg.intermediate_size, cfg.hidden_size = len(plan.channels[0]), len(plan.hidden)
    cfg.dtype = torch.float32  # the sliced weights are saved in fp32
    state = sliced_state(model, plan)
    pruned = type(model)(cfg).to(torch.float32)
    pruned.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return pruned.to(next(model.parameters()).device).train(model.training)


def prune_width(model: nn.Module, cfg: WidthPrune, calibration: list[torch.Tensor] | None) -> tuple[nn.Module, WidthPlan]:
    """Rank (:func:`importance`), plan (:func:`plan_width`) and slice (:func:`apply_width`)."""
    check_width(model, cfg)
    if not calibration:
        raise PruneTargetError("prune.width needs calibration batches (prune.calibration)")
    plan = plan_width(model, cfg, importance(model, calibration))
    return apply_width(model, plan), plan
