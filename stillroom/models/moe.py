"""Sparse mixture-of-experts students upcycled from a dense Llama-family decoder (LLaVA-MoD's student).

:func:`upcycle_to_moe` turns a dense ``LlamaForCausalLM`` into a ``MixtralForCausalLM`` (and a
``LlavaForConditionalGeneration`` whose language model is a Llama into the same Llava class with a Mixtral
language model): every decoder layer's MLP ``down(act(gate(x)) * up(x))`` becomes E experts, each a copy of
that MLP (plus optional Gaussian noise of std ``noise_std``), behind a top-k router (Mixtral's: softmax
over all E experts, the k largest kept and renormalised to sum 1). Attention, norms, embeddings and head
are copied unchanged. The result is an ordinary transformers model: ``save_pretrained`` writes a folder
that ``AutoModelForCausalLM`` (or the Llava class) loads without stillroom. Every decoder layer is
converted (Mixtral's class has no dense layers).

Why the logits are unchanged at init: with identical experts, ``sum_k w_k E(x) = E(x)`` because the
kept router weights sum to 1, whatever the router picks (tested: the parity test in
``tests/unit/models/test_moe.py``).

Load balancing (Switch Transformer eq. 4-6, as ``transformers``' ``load_balancing_loss_func``):

    L_aux = E * sum_e f_e * P_e,   f_e = share of the top-k assignments routed to expert e,
                                   P_e = mean router probability of expert e,

over every token of every layer; it is 1 when routing is uniform. :class:`RouterTap` collects the
router logits of a forward pass so a training objective can add ``coef * L_aux``.

Capacity (DeepSpeed's top-2 gating, which LLaVA-MoD trains with): expert e takes at most
``ceil(capacity_factor * k * T / E)`` of the ``T`` tokens of a forward pass; first choices are placed
before second choices, in token order; an assignment past capacity is dropped and the token's kept
weights are renormalised (a token with every choice dropped passes through the residual only).
:class:`RouterTap` applies it in training mode only; evaluation and generation are dropless, as the
saved Mixtral model is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

DENSE_MLP_KEYS = ("gate_proj", "up_proj", "down_proj")


class UpcycleError(ValueError):
    """The dense model cannot be upcycled (its class, its MLP or a setting); the message says how to fix it."""


@dataclass(frozen=True)
class MoeShape:
    """What to build: ``experts`` (E) copies of each MLP, ``top_k`` routed per token."""

    experts: int = 4
    top_k: int = 2
    noise_std: float = 0.0
    router_std: float | None = None
    """Std of the router's Gaussian init (``None``: the model's ``initializer_range``)."""
    aux_coef: float = 0.01
    seed: int = 0


# ---------------------------------------------------------------- building the MoE model

def _text_config(model: nn.Module):
    """The config of the decoder to upcycle (the Llava language model's ``text_config``, or the model's)."""
    cfg = model.config
    return cfg.text_config if hasattr(cfg, "text_config") else cfg


def mixtral_config(dense_cfg, shape: MoeShape):
    """A ``MixtralConfig`` with the dense Llama config's sizes and ``shape``'s experts (no sliding window)."""
    from transformers import MixtralConfig

    if getattr(dense_cfg, "model_type", None) != "llama":
        raise UpcycleError(f"cannot upcycle a {getattr(dense_cfg, 'model_type', '?')!r} decoder: llava_mod.moe "
                           "upcycles Llama-family decoders (LlamaForCausalLM, or a Llava whose text model is Llama)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(dense_cfg, flag, False):
            raise UpcycleError(f"the dense model has {flag}=True, which Mixtral's layers do not have; "
                               "upcycle a Llama without biases")
    if not 1 <= shape.top_k <= shape.experts:
        raise UpcycleError(f"llava_mod.moe.top_k={shape.top_k} must be in 1..experts={shape.experts}")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
            "rope_parameters", "attention_dropout")
    values = {k: getattr(dense_cfg, k) for k in keep if getattr(dense_cfg, k, None) is not None}
    return MixtralConfig(**values, sliding_window=None, num_local_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, router_aux_loss_coef=shape.aux_coef,
                         output_router_logits=False, router_jitter_noise=0.0)


def moe_state_dict(dense: dict[str, torch.Tensor], shape: MoeShape, router_std: float,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The dense state dict with each ``*.mlp.{gate,up,down}_proj.weight`` replaced by Mixtral's fused experts.

    ``gate_up_proj`` ``[E, 2I, H]`` = E copies of ``cat(gate [I, H], up [I, H])``; ``down_proj`` ``[E, H, I]``;
    ``mlp.gate.weight`` ``[E, H]`` the router, Gaussian with std ``router_std``. With ``noise_std > 0``
    each expert copy gets independent Gaussian noise of that std (breaks the experts' symmetry).
    """
    out, E = {}, shape.experts
    for key, value in dense.items():
        prefix, _, name = key.partition(".mlp.")
        if name not in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            out[key] = value  # attention, norms, embeddings, head; a vision tower's own MLPs (fc1/fc2)
            continue
        if name == "gate_proj.weight":
            gate, up, down = (dense[f"{prefix}.mlp.{k}.weight"] for k in DENSE_MLP_KEYS)
            gate_up = torch.cat([gate, up], dim=0).unsqueeze(0).repeat(E, 1, 1)
            down_e = down.unsqueeze(0).repeat(E, 1, 1)
            if shape.noise_std > 0:
                gate_up = gate_up + shape.noise_std * torch.randn(gate_up.shape, generator=generator).to(gate_up)
                down_e = down_e + shape.noise_std * torch.randn(down_e.shape, generator=generator).to(down_e)
            out[f"{prefix}.mlp.experts.gate_up_proj"] = gate_up
            out[f"{prefix}.mlp.experts.down_proj"] = down_e
            router = router_std * torch.randn((E, gate.shape[1]), generator=generator)
            out[f"{prefix}.mlp.gate.weight"] = router.to(gate)
    return out


def upcycle_to_moe(model: PreTrainedModel, shape: MoeShape) -> PreTrainedModel:
    """A new fp32 MoE model (``MixtralForCausalLM``, or a Llava with a Mixtral language model) upcycled from
    the dense ``model`` (left untouched; no storage shared). See the module docstring."""
    from transformers import LlavaForConditionalGeneration, MixtralForCausalLM

    dense_cfg = _text_config(model)
    moe_cfg = mixtral_config(dense_cfg, shape)
    generator = torch.Generator().manual_seed(shape.seed)
    std = shape.router_std if shape.router_std is not None else dense_cfg.initializer_range
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    new_state = moe_state_dict(state, shape, std, generator)
    if hasattr(model.config, "text_config"):
        cfg = type(model.config)(**{**model.config.to_dict(), "text_config": moe_cfg.to_dict()})
        target = LlavaForConditionalGeneration(cfg)
    else:
        target = MixtralForCausalLM(moe_cfg)
    missing, unexpected = target.load_state_dict(new_state, strict=False)
    tied = {"lm_head.weight"} if getattr(moe_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise UpcycleError(f"upcycling left weights unmapped: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        target.tie_weights()
    return target.float()


def upcycle_student(student: PreTrainedModel, section, *, aux_coef: float, seed: int, log) -> PreTrainedModel:
    """``student`` upcycled as ``section`` (:class:`stillroom.config.llava_mod.MoeUpcycleConfig`) says, in its
    dtype, with the active/total parameter counts logged; ``student`` itself when ``section.upcycle`` is false."""
    if not section.upcycle:
        return student
    dense = parameter_counts(student)
    shape = MoeShape(experts=section.experts, top_k=section.top_k, noise_std=section.noise_std,
                     router_std=section.router_std, aux_coef=aux_coef, seed=seed)
    moe = upcycle_to_moe(student, shape).to(next(student.parameters()).dtype)
    counts = parameter_counts(moe)
    log(f"student: upcycled to {type(moe).__name__} ({section.experts} experts, top-{section.top_k}): "
        f"{counts['active'] / 1e6:.3f}M active / {counts['total'] / 1e6:.3f}M total parameters "
        f"(dense: {dense['total'] / 1e6:.3f}M)")
    return moe


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``total`` parameters and ``active`` ones per token: experts count ``top_k / E`` of their weights."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if type(module).__name__.endswith("Experts") and hasattr(module, "num_experts"):
            k = _text_config(model).num_experts_per_tok
            experts = sum(p.numel() for p in module.parameters(recurse=False))
            inactive += experts - experts * k // module.num_experts
    return {"total": total, "active": total - inactive}


def is_moe(model: nn.Module) -> bool:
    """Whether ``model`` has routed experts (a Mixtral-style router)."""
    return bool(routers(model))


# ---------------------------------------------------------------- routing during training

def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-style ``E * sum_e f_e P_e`` over every layer's ``[T, E]`` router logits (module docstring).

    ``f_e``: the share of the ``T * top_k * layers`` assignments that pick expert e (no gradient, as
    in Switch); ``P_e``: the mean softmax probability of e (carries the gradient). A scalar, fp32.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one layer")
    logits_le = torch.cat([r.float() for r in router_logits], dim=0)
    E = logits_le.shape[-1]
    probs_le = torch.softmax(logits_le, dim=-1)
    chosen = torch.topk(probs_le, top_k, dim=-1).indices
    f_e = torch.zeros(E, device=probs_le.device).scatter_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs_le.device)) / chosen.numel()
    p_e = probs_le.mean(dim=0)
    return E * (f_e * p_e).sum()


def apply_capacity(scores_tk: torch.Tensor, index_tk: torch.Tensor, experts: int,
                   capacity_factor: float) -> torch.Tensor:
    """Router weights ``[T, k]`` with assignments past each expert's capacity dropped, kept ones renormalised.

    Capacity ``C = ceil(capacity_factor * k * T / E)``; assignments are placed choice by choice (every token's
    first choice, in token order, then the second ...). A token whose choices are all dropped gets weights 0.
    """
    T, k = index_tk.shape
    capacity = math.ceil(capacity_factor * k * T / experts)
    onehot_kte = torch.nn.functional.one_hot(index_tk.t(), experts)  # choice-major order [k, T, E]
    position_kte = onehot_kte.reshape(k * T, experts).cumsum(0).reshape(k, T, experts) - 1
    position_tk = (position_kte * onehot_kte).sum(-1).t()  # [T, k] place of each assignment in its expert
    kept_tk = (position_tk < capacity).to(scores_tk.dtype)
    kept_scores = scores_tk * kept_tk
    total_t1 = kept_scores.sum(dim=-1, keepdim=True)
    return torch.where(total_t1 > 0, kept_scores / total_t1.clamp(min=1e-20), torch.zeros_like(kept_scores))


class RouterTap:
    """While open (``with RouterTap(model, cf) as tap:``), forward hooks on every router of ``model`` record its
    logits ``[T, E]`` in ``tap.logits`` (for :func:`load_balancing_loss`) and, with a ``capacity_factor``,
    drop assignments past capacity, in training mode only. The hooks are removed on exit, so a copy of the
    model (the CE baseline) or an evaluation never carries them.
    """

    def __init__(self, model: nn.Module, capacity_factor: float | None):
        self.capacity_factor = capacity_factor
        self.logits: list[torch.Tensor] = []
        self.routers = routers(model)
        if not self.routers:
            raise UpcycleError(f"{type(model).__name__} has no routed experts; llava_mod needs an MoE student "
                               "(set llava_mod.moe.upcycle: true, or load an MoE student folder)")
        self.top_k = self.routers[0].top_k
        self.handles: list = []

    def __enter__(self) -> "RouterTap":
        self.logits = []
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module: nn.Module, _args, output):
        if not module.training:
            return None
        logits_te, scores_tk, index_tk = output
        self.logits.append(logits_te)
        if self.capacity_factor is None:
            return None
        kept = apply_capacity(scores_tk, index_tk, module.num_experts, self.capacity_factor)
        return logits_te, kept.to(scores_tk.dtype), index_tk


def routers(model: nn.Module) -> list[nn.Module]:
    """Every top-k router of ``model`` (Mixtral-style ``*TopKRouter`` modules), in layer order."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
