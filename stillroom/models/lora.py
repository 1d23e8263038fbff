"""LoRA through peft, and the accessors the fused loss path needs on any wrapping.

``unwrap`` peels DDP / DataParallel / ``torch.compile`` / peft wrappers down to
the Hugging Face model. With peft, that model has the LoRA layers injected in
place, so its submodules (``decoder_body``, ``output_head``) compute the
adapted function, not the frozen base.

For the fused path: ``output_head(m)(decoder_body(m)(input_ids).last_hidden_state)``
equals ``m(input_ids).logits`` ([B, T, H] -> [B, T, V]). Models whose logits are
not a plain linear map of the last hidden state (final-logit soft-capping, a
logit scale) are refused by :func:`output_head` with a hint to set
``loss.fused=false``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from stillroom.config.schema import LoraConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying HF model of a DDP / DataParallel / compiled / peft-wrapped model (itself if plain)."""
    seen = 0
    while seen < 16:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif _is_peft(model):
            model = model.get_base_model()
        else:
            return model
    raise ValueError("unwrap: more than 16 nested wrappers; is the model wrapped in itself?")


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep plain models usable without it
        return False
    return isinstance(model, PeftModel)


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that maps ``input_ids`` to the last hidden state after the final norm.

    E.g. ``model.model`` for Llama/Qwen/Mistral, ``model.transformer`` for GPT-2.
    Calling it returns an output with ``last_hidden_state`` [B, T, H].
    With DDP, call it only inside a module that DDP wraps (as the training loop's
    ``StudentForward`` does); calling it directly bypasses DDP's forward bookkeeping.
    """
    base = unwrap(model)
    getter = getattr(base, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None or body is base:
        body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is base:
        raise TypeError(
            f"cannot find the decoder body of {type(base).__name__} (no get_decoder() and no "
            f"`{getattr(base, 'base_model_prefix', '?')}` attribute); set loss.fused=false to use the plain path"
        )
    return body


def body_of(model: nn.Module) -> nn.Module:
    """The module giving the last hidden state: the decoder body, or for a vision-language (LLaVA-style) model
    its inner model (vision tower + projector + decoder; it takes ``pixel_values``, the decoder alone does not)."""
    base = unwrap(model)
    if getattr(base.config, "vision_config", None) is not None and hasattr(base, "model"):
        return base.model
    return decoder_body(model)


def output_head(model: nn.Module) -> nn.Module:
    """The LM head ([..., H] -> [..., V]): an ``nn.Linear``, or peft's LoRA layer around it.

    When LoRA targets the head itself the returned module is a peft layer whose
    ``.weight`` is the *frozen base*; call the module (don't read ``.weight``) to
    get the adapted logits.
    """
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} post-processes its logits (config.{attr}={value}), so logits are not "
                "head(last hidden state); set loss.fused=false"
            )
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(base).__name__} has no output embeddings (LM head); set loss.fused=false")
    inner = getattr(head, "base_layer", head)
    if not isinstance(inner, nn.Linear):
        raise TypeError(f"the LM head of {type(base).__name__} is a {type(inner).__name__}, not nn.Linear")
    return head


def apply_lora(model: PreTrainedModel, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only adapter weights stay trainable.

    Adapters start as an identity (B = 0), so the wrapped model computes exactly
    what ``model`` did. Raises ``ValueError`` naming the linear layers available
    when none of ``cfg.target_modules`` exists in the model.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if not names.intersection(cfg.target_modules):
        raise ValueError(
            f"student.lora.target_modules={cfg.target_modules} matches no linear layer of "
            f"{type(model).__name__}; available: {sorted(names)}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head and n), None)
    tied = head is not None and head.weight is getattr(model.get_input_embeddings(), "weight", None)
    if tied and head_name in cfg.target_modules:
        raise ValueError(
            f"student.lora.target_modules includes `{head_name}`, but the model ties it to the input embeddings: "
            "merging that adapter would also change the embeddings. Remove it from target_modules, or untie the "
            "head first (config.tie_word_embeddings=false)"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=[t for t in cfg.target_modules if t in names],
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and return the plain HF model (unchanged if no adapters).

    Peels DDP/compile wrappers first. The result computes the same logits as the
    adapted model and saves as an ordinary checkpoint.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module)
    ):
        model = model.module if hasattr(model, "module") else model._orig_mod
    if _is_peft(model):
        with torch.no_grad():
            return model.merge_and_unload()
    return model


def use_eager_attention(model: nn.Module) -> None:
    """Attention maps are only returned by the eager implementation (SDPA/flash fuse them away)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter("eager")
    else:
        unwrap(model).config._attn_implementation = "eager"
