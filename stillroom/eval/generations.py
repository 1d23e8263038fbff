"""Greedy generations for the side-by-side section of the report."""

from __future__ import annotations

import torch

from stillroom.data.prompts import prompt_ids

from stillroom.eval.metrics import _model_device

GENERATION_BATCH = 16
"""Prompts decoded together (left-padded): the report's handful in one batch, a knowledge set in a few."""


def greedy_generations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | list[list[dict]],
    max_new_tokens: int,
) -> list[str]:
    """Greedy (``do_sample=False``) continuations of ``prompts``; only the new text.

    Up to :data:`GENERATION_BATCH` prompts decode together, left-padded with an attention mask that hides the
    padding (the model's generate derives each row's positions from it), so every row continues as it would
    alone: measured on SmolLM2-135M and its 10-layer student, 3 report prompts x 32 tokens gave the same text
    at 0.36-0.39x the time of one prompt at a time (tested against step-by-step greedy decoding of each prompt
    alone). A row that ends (EOS) is filled with padding, which decoding drops with the other special tokens.
    The model is put in eval mode and its previous mode restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [prompt_ids(tokenizer, prompt, f"prompt {i}") for i, prompt in enumerate(prompts)]
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), GENERATION_BATCH):
                ids, mask = _left_padded(rows[start : start + GENERATION_BATCH], pad_id, device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                )
                outputs += [tokenizer.decode(row[ids.shape[1] :].tolist(), skip_special_tokens=True) for row in out]
    finally:
        model.train(was_training)
    return outputs


def _left_padded(rows: list[list[int]], pad_id: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[B, T_max]``: each row right-aligned (its last prompt token at the last column), the
    mask 0 over the padding (id ``pad_id``, or 0 where the tokenizer has none: never attended)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)
