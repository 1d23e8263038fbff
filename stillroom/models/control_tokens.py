"""Adding special tokens to a tokenizer and growing a model's embeddings to match, deterministically."""

from __future__ import annotations

import torch


@torch.no_grad()
def add_special_tokens(model: torch.nn.Module, tokenizer, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens and resize ``model`` in place; returns their ids.

    New embedding rows (and output-head rows when untied) are the mean of the existing rows,
    so no randomness is involved and the old tokens' logits do not change. Rows are added only
    when the embedding matrix is narrower than the tokenizer (padded heads keep their width).
    """
    try:  # transformers >= 5
        tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    except TypeError:  # transformers 4.x
        tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(dim=0, keepdim=True)
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.data_ptr():
            head.weight[old:] = head.weight[:old].mean(dim=0, keepdim=True)
            if getattr(head, "bias", None) is not None:
                head.bias[old:] = head.bias[:old].mean()
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
