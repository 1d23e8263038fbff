"""Greedy generations for the side-by-side section of the report."""

from __future__ import annotations

import torch

from stillroom.data.prompts import prompt_ids

from stillroom.eval.metrics import _model_device


def greedy_generations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str] | list[list[dict]],
    max_new_tokens: int,
) -> list[str]:
    """Greedy (``do_sample=False``) continuations of ``prompts``; only the new text.

    Prompts run one at a time (no padding, so no padding-side pitfalls; the report
    shows a handful). Special tokens are stripped from the decoded text. The
    model is put in eval mode and its previous mode restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                ids = torch.tensor([prompt_ids(tokenizer, prompt, f"prompt {i}")], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                )
                new_ids = out[0, ids.shape[1] :].tolist()
                outputs.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs
