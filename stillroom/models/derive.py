"""Derive a student from a teacher by keeping some of its decoder layers.

Strategies (:class:`~stillroom.config.schema.LayerSelection`):

* ``explicit``: keep ``layers`` (sorted, unique, in range).
* ``every_n``: keep layers ``0, n, 2n, ...``.
* ``angular``: keep ``num_layers`` layers by dropping the contiguous block of
  ``n = L - num_layers`` layers whose removal changes the residual stream least,
  measured by the angular distance between the block's input and output
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):

      d(l, n) = mean over calibration tokens of arccos(cos(h_l, h_{l+n})) / pi

  where ``h_l`` is the input of layer ``l`` and ``h_{l+n}`` the output of layer
  ``l+n-1`` (before the final norm). ``d`` is in [0, 1]; 0 means the block maps
  every token's hidden state to a parallel vector. Layer 0 (which turns raw
  embeddings into a usable residual stream) and the last layer (which feeds the
  head) are never dropped: the block start ``l`` ranges over ``1 .. L-n-1``.
  All calibration tokens count (no padding is assumed in ``calibration``).

The student is a deep copy (no storage shared with the teacher) in fp32 with
embeddings, final norm and head copied; ``config.num_hidden_layers``,
``config.layer_types`` and every ``layer_idx`` are renumbered so that the KV cache
indexes the kept layers 0..k-1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from stillroom.config.schema import LayerSelection
from stillroom.models.errors import LayerSelectionError
from stillroom.models.lora import decoder_body, unwrap

# Config fields holding one entry per decoder layer (reindexed with the kept layers).
PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (Llama-style ``model.layers``, GPT-2 ``transformer.h``, ...)."""
    base = unwrap(model)
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.layers"):
        obj: object = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise LayerSelectionError(
        f"cannot find the decoder layers of {type(base).__name__} (looked for model.layers, transformer.h, ...); "
        "load a student with `student.model` instead of deriving it"
    )


def select_layers(
    model: nn.Module, selection: LayerSelection, calibration: list[torch.Tensor] | None = None
) -> list[int]:
    """Indices of the decoder layers to keep, ascending. Raises :class:`LayerSelectionError`."""
    num = len(decoder_layers(model))
    if selection.strategy == "explicit":
        keep = list(selection.layers or [])
        if not keep:
            raise LayerSelectionError("student.from_teacher.layers is empty; list the teacher layers to keep")
        bad = [i for i in keep if not isinstance(i, int) or not 0 <= i < num]
        if bad:
            raise LayerSelectionError(
                f"student.from_teacher.layers has out-of-range indices {bad}; the teacher has {num} layers (0..{num - 1})"
            )
        dups = sorted({i for i in keep if keep.count(i) > 1})
        if dups:
            raise LayerSelectionError(f"student.from_teacher.layers repeats {dups}; each layer can be kept once")
        if keep != sorted(keep):
            raise LayerSelectionError(
                f"student.from_teacher.layers={keep} is not ascending; write it as {sorted(keep)} "
                "(layers keep their order in the student)"
            )
        return keep
    if selection.strategy == "every_n":
        assert selection.every_n is not None
        return list(range(0, num, selection.every_n))
    assert selection.num_layers is not None
    k = selection.num_layers
    if k >= num:
        if k > num:
            raise LayerSelectionError(f"student.from_teacher.num_layers={k} exceeds the teacher's {num} layers")
        return list(range(num))
    if k < 2:
        raise LayerSelectionError(
            f"student.from_teacher.num_layers={k}: angular selection keeps the first and last layers, so it needs >= 2"
        )
    if not calibration:
        raise LayerSelectionError("angular layer selection needs calibration batches (a non-empty list of input_ids)")
    n = num - k
    dist = angular_distances(model, calibration, n)
    start = min(range(1, num - n), key=lambda l: dist[l])  # ties: the earliest block
    return [i for i in range(num) if not start <= i < start + n]


@torch.no_grad()
def angular_distances(model: nn.Module, calibration: list[torch.Tensor], n: int) -> list[float]:
    """``d[l]`` for every block start ``l = 0 .. L-n``: mean angular distance (in [0, 1]) over all
    calibration tokens between the input of layer ``l`` and the output of layer ``l+n-1``.

    ``calibration``: list of ``input_ids`` [B, T] (no padding assumed); the hidden states come from
    :func:`layer_boundary_states`; the cosines are computed in float64.
    """
    num = len(decoder_layers(model))
    if not 1 <= n <= num:
        raise LayerSelectionError(f"block length n={n} must be in 1..{num}")
    sums = torch.zeros(num - n + 1, dtype=torch.float64)
    count = 0
    for hs in layer_boundary_states(model, calibration):
        for l in range(num - n + 1):  # upcast two at a time: memory stays ~ (L + 4) hidden states
            a, b = hs[l].to(torch.float64), hs[l + n].to(torch.float64)
            cos = nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
            sums[l] += (torch.arccos(cos) / math.pi).sum().cpu()
        count += hs[0].shape[0]
    return (sums / count).tolist()


@torch.no_grad()
def layer_boundary_states(model: nn.Module, calibration: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Per calibration batch, ``L + 1`` hidden states ``[B*T, H]``: ``h_0`` the input of layer 0 and ``h_{i+1}``
    the output of layer ``i`` (before the final norm).

    ``calibration``: list of ``input_ids`` [B, T] (no padding assumed). Runs the decoder body (no LM head)
    in eval mode without cache (restoring the training flag), in the model's own dtype.
    """
    layers = decoder_layers(model)
    num = len(layers)
    if not calibration:
        raise LayerSelectionError("layer distances need at least one calibration batch")
    captured: list[torch.Tensor | None] = [None] * (num + 1)  # h_0 = input of layer 0, h_i+1 = output of i

    def first_input(_mod, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    def output_of(i):
        def hook(_mod, _args, out):
            captured[i + 1] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(output_of(i)) for i, layer in enumerate(layers)]
    try:  # the body alone: the LM head ([T, V] logits) is not needed here
        run = decoder_body(model)
    except TypeError:
        run = model
    was_training = model.training
    device = next(unwrap(model).parameters()).device
    model.eval()
    try:
        for ids_bt in calibration:
            if ids_bt.dim() != 2 or ids_bt.numel() == 0:
                raise LayerSelectionError(f"calibration batches must be non-empty input_ids [B, T]; got {tuple(ids_bt.shape)}")
            captured[:] = [None] * (num + 1)
            run(input_ids=ids_bt.to(device), use_cache=False)
            yield [h.detach().reshape(-1, h.shape[-1]) for h in captured]  # [B*T, H] each, model dtype
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def derive_student(
    teacher: PreTrainedModel, selection: LayerSelection, calibration: list[torch.Tensor] | None = None
) -> tuple[PreTrainedModel, list[int]]:
    """A new fp32 model of the teacher's class keeping the selected decoder layers.

    Returns ``(student, kept)``; ``kept[j]`` is the teacher layer that became the
    student's layer ``j``. The teacher is not modified and shares no storage
    with the student. ``calibration`` (list of input_ids [B, T]) is needed for
    ``strategy=angular`` only.
    """
    base = unwrap(teacher)
    keep = select_layers(base, selection, calibration)
    layers = decoder_layers(base)
    num = len(layers)
    # Deep-copy everything except the dropped layers: the memo maps the teacher's
    # layer list to a fresh list of copies of the kept ones.
    memo: dict[int, object] = {}
    kept_copies = nn.ModuleList([copy.deepcopy(layers[i], memo) for i in keep])
    memo[id(layers)] = kept_copies
    student = copy.deepcopy(base, memo)
    student.to(torch.float32)
    for j, layer in enumerate(kept_copies):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    cfg = student.config
    cfg.num_hidden_layers = len(keep)
    for field in PER_LAYER_CONFIG_FIELDS:
        value = getattr(cfg, field, None)
        if isinstance(value, (list, tuple)) and len(value) == num:
            setattr(cfg, field, [value[i] for i in keep])
    if hasattr(cfg, "dtype"):
        cfg.dtype = torch.float32
    return student, keep


def student_from_config(teacher: torch.nn.Module, changes: dict, *, seed: int = 0, tokenizer=None) -> torch.nn.Module:
    """A randomly initialised model of the teacher's class, from the teacher's config with ``changes``.

    The vocabulary size, special token ids and tokenizer stay the teacher's (required for
    distillation and speculative decoding); ``changes`` may not alter ``vocab_size``. With
    ``tokenizer`` (a cross-tokenizer student) they follow that tokenizer instead. Unknown
    config keys are refused, naming the valid ones nearest in spelling. ``layer_types`` (a
    per-layer list in recent configs) is resized to the new depth.
    """
    import difflib

    cfg = copy.deepcopy(teacher.config)
    known = set(cfg.to_dict())
    for key, value in changes.items():
        if key == "vocab_size":
            raise ValueError("student.from_config cannot change vocab_size: the student shares the teacher's tokenizer")
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=3)
            raise ValueError(f"student.from_config.{key}: not a field of the teacher's {type(cfg).__name__}"
                             + (f"; did you mean {', '.join(near)}?" if near else ""))
        setattr(cfg, key, value)
    if tokenizer is not None:
        cfg.vocab_size = len(tokenizer)
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) != cfg.num_hidden_layers:
        cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
    if hasattr(cfg, "head_dim") and "head_dim" not in changes and ("hidden_size" in changes or "num_attention_heads" in changes):
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    torch.manual_seed(seed)
    model = type(teacher)(cfg)
    return model.float()
