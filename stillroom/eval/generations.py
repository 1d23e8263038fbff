"""Greedy generations for the side-by-side section of the report."""

from __future__ import annotations

import torch

from stillroom.eval.metrics import _model_device


def _prompt_ids(tokenizer, prompt: str | list[dict], index: int) -> list[int]:
    """Token ids of one prompt: plain text, or chat messages rendered with the
    tokenizer's chat template (``add_generation_prompt=True``)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"prompt {index} is a list of chat messages but the tokenizer has no chat_template; "
                "pass plain-text prompts or use a tokenizer with a chat template"
            )
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        # The template already contains any BOS/special tokens it wants.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        raise TypeError(
            f"prompt {index}: expected a string or a list of {{'role', 'content'}} dicts, got {type(prompt).__name__}"
        )
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError(f"prompt {index} tokenizes to no tokens and the tokenizer has no BOS token")
        ids = [bos]
    return list(ids)


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
                ids = torch.tensor([_prompt_ids(tokenizer, prompt, i)], dtype=torch.long, device=device)
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
