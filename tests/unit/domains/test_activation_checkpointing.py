"""``train.activation_checkpointing``: the same gradients with and without it (fp32), and a named refusal for a
model that cannot checkpoint."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from stillroom.domains.lm.prepare import _activation_checkpointing


def _grads(model, ids):
    """``(gradients by name, bytes of the tensors the forward pass saved for backward)``."""
    model.train()
    model.zero_grad()
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_checkpointed_gradients_equal_the_plain_ones():
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(97, layers=3, max_positions=64, seed=0)
    plain, plain_bytes = _grads(model, ids)
    _activation_checkpointing(model)
    assert model.is_activation_checkpointing
    checkpointed, checkpointed_bytes = _grads(model, ids)
    assert checkpointed_bytes < plain_bytes / 2  # the layers' activations were not kept: checkpointing is on
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=0, atol=1e-6, msg=name)


def test_a_model_without_checkpointing_is_refused_by_name():
    with pytest.raises(ValueError, match="train.activation_checkpointing: Linear does not support gradient "
                                         "checkpointing; set train.activation_checkpointing=false"):
        _activation_checkpointing(torch.nn.Linear(2, 2))
