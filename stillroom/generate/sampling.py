"""Batched sampling of continuations with a KV cache (used by on-policy methods and reports).

The loop is written out here rather than delegated to ``model.generate`` so that
randomness comes only from the caller's ``torch.Generator`` (``generate`` draws from the
global RNG) and so the sampling rule is the same one speculative decoding uses
(:func:`stillroom.generate.distributions.warp_to_probs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from stillroom.generate.distributions import check_sampling_args, sample_from, warp_to_probs


def stop_ids(eos_token_id: int | Sequence[int] | None) -> frozenset[int]:
    """The set of token ids that end a continuation (empty: never stop early)."""
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset((eos_token_id,))
    return frozenset(int(i) for i in eos_token_id)


def eos_token_ids(tokenizer: Any, *models: torch.nn.Module | None) -> list[int]:
    """End-of-sequence ids of the tokenizer and of the models' generation configs (sorted, deduplicated)."""
    ids: set[int] = set()
    values = [getattr(tokenizer, "eos_token_id", None)]
    values += [getattr(getattr(m, "generation_config", None), "eos_token_id", None) for m in models if m is not None]
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` from transformers 5.24 on, ``past_key_values`` in 5.0-5.23)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


# The forward keyword that carries the KV cache, newest name first. transformers 5.0-5.23 name it
# ``past_key_values`` and take every other keyword through ``**kwargs``, which the attention layers
# ignore: a ``cache=`` there is dropped without an error and the model starts a fresh cache.
# 5.24 renamed it ``cache`` (``past_key_values`` is still mapped to it, deprecated, due to go in 5.40).
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a KV cache: the one its signature names.

    Wrappers (DDP, ``torch.compile``, peft) are looked through: they pass keywords on to the
    model inside. Raises ``TypeError`` when the forward names neither keyword (a model that
    only has ``**kwargs`` cannot be shown to use the cache it is given).
    """
    from stillroom.models.lora import unwrap  # lazy: stillroom.models pulls in the config schema

    base = unwrap(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        params = {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for name in CACHE_KEYWORDS:
        if name in params and params[name].kind in named:
            return name
    raise TypeError(
        f"{type(base).__name__}.forward takes neither `cache` (transformers >= 5.24) nor `past_key_values` "
        "(transformers 5.0-5.23) as a named argument, so KV-cached generation cannot pass it a cache"
    )


def checked_cache(output: Any, expected: int, keyword: str, model: torch.nn.Module) -> Any:
    """The cache ``output`` returned, after checking that it covers ``expected`` positions.

    A model that ignored the cache it was given (e.g. ``cache=`` passed to transformers < 5.24,
    which swallows it) returns a fresh cache holding only the tokens of this call, and logits
    computed without the earlier context; this refuses that instead of decoding garbage.
    """
    cache = cache_of(output)
    got = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else None
    if got != expected:
        raise RuntimeError(
            f"{type(model).__name__} returned a KV cache of {got} positions where {expected} were expected: "
            f"it did not use the cache passed as `{keyword}=` (transformers {_transformers_version()}). "
            "transformers 5.0-5.23 take `past_key_values`, 5.24 and later `cache`; a custom model must name "
            "one of them in its forward and return the extended cache as `cache` or `past_key_values`"
        )
    return cache


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "not installed"


class eval_mode:
    """Context manager: put a module in eval mode (no dropout) and restore its previous mode."""

    def __init__(self, *modules: torch.nn.Module | None):
        self.modules = [m for m in modules if m is not None]
        self.was_training: list[bool] = []

    def __enter__(self) -> None:
        self.was_training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        # Reverse order, so a module nested in another one gets its own mode back last.
        for m, mode in reversed(list(zip(self.modules, self.was_training))):
            m.train(mode)


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both ``[B, W]`` long: the id lists right-aligned (padded on the left with ``pad``), so every
    row's next token is generated at the same column; ``mask`` is 1 on real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids, mask


def _resolve_pad(tokenizer: Any, pad_token_id: int | None, stops: frozenset[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return min(stops) if stops else 0


@torch.inference_mode()
def sample_continuations(
    model: torch.nn.Module,
    tokenizer: Any | None,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    sampling_temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    pixel_values: torch.Tensor | None = None,
) -> list[list[int]]:
    """Continue every prompt; return only the new tokens, each list cut after its first EOS (inclusive).

    Prompts are left-padded into one batch ``[B, P]`` (positions count real tokens
    only, so a padded prompt gets the same positions as when run alone), the prompt
    is processed in one forward pass, then one token per step reuses the KV cache.

    ``greedy=True`` takes the argmax and ignores temperature/top-p; otherwise tokens are
    drawn from ``warp_to_probs(logits, sampling_temperature, top_p)`` with ``generator``,
    so equal seeds give equal outputs. ``eos_token_id`` may be one id, several ids
    (chat models often have more than one end token) or ``None`` (always produce
    ``max_new_tokens``). ``pad_token_id`` defaults to the tokenizer's pad, then EOS
    token. The model is run in eval mode (dropout off) and its mode is restored.

    ``pixel_values`` (a LLaVA-style model): ``[I, 3, S, S]``, the images of the prompts that hold image tokens,
    in prompt order (a batch may mix image and text prompts); they are read by the prompt's forward only, as
    in :func:`stillroom.generate.speculative.autoregressive_generate`, which this matches token for token.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if not greedy:
        check_sampling_args(sampling_temperature, top_p)
    if not prompt_ids:
        return []
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    stops = stop_ids(eos_token_id)
    pad = _resolve_pad(tokenizer, pad_token_id, stops)
    device = model_device(model)

    batch = len(prompt_ids)
    input_ids_bt, attention_bt = left_pad(prompt_ids, pad)
    width = input_ids_bt.shape[1]
    input_ids_bt, attention_bt = input_ids_bt.to(device), attention_bt.to(device)
    positions_bt = (attention_bt.cumsum(-1) - 1).clamp(min=0)

    new_tokens: list[list[int]] = [[] for _ in prompt_ids]
    finished = [False] * batch
    keyword = cache_keyword(model)
    with eval_mode(model):
        out = model(
            input_ids=input_ids_bt,
            attention_mask=attention_bt,
            position_ids=positions_bt,
            use_cache=True,
            logits_to_keep=1,
            **({} if pixel_values is None else {"pixel_values": pixel_values.to(device)}),
        )
        cache = checked_cache(out, width, keyword, model)
        next_pos_b1 = positions_bt[:, -1:] + 1
        for step in range(max_new_tokens):
            logits_bv = out.logits[:, -1, :]
            if greedy:
                tokens_b = logits_bv.argmax(dim=-1)
            else:
                tokens_b = sample_from(warp_to_probs(logits_bv, sampling_temperature, top_p), generator)
            tokens = tokens_b.tolist()
            for b, tok in enumerate(tokens):
                if finished[b]:
                    tokens_b[b] = pad
                    continue
                new_tokens[b].append(tok)
                finished[b] = tok in stops
            if all(finished) or step == max_new_tokens - 1:
                break
            attention_bt = torch.cat([attention_bt, attention_bt.new_ones((batch, 1))], dim=1)
            out = model(
                input_ids=tokens_b[:, None],
                attention_mask=attention_bt,
                position_ids=next_pos_b1,
                use_cache=True,
                **{keyword: cache},
            )
            cache = checked_cache(out, attention_bt.shape[1], keyword, model)
            next_pos_b1 = next_pos_b1 + 1
    return new_tokens
