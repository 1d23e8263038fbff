"""CorDA through peft: the wrapped model is unchanged at step 0 (W = residual + BA), the adapters hold the
smallest (kpm) or largest (ipm) components of W C, and the merged model equals the original."""

import copy

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.schema import LoraConfig
from stillroom.models import merge_lora
from stillroom.models.corda import apply_corda

LAYER = "model.layers.1.mlp.down_proj"


def _calibration(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (2, 24), generator=g) for _ in range(3)]  # 6 sequences


def _damped_covariance(model, calib) -> torch.Tensor:
    """C~ of LAYER as peft builds it: mean over sequences of (X / max X)^T (X / max X), damped until invertible."""
    inputs = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda _m, i, _o: inputs.append(i[0][0].float()))
    with torch.no_grad():
        for batch in calib:
            for row in batch:
                model(input_ids=row[None])
    handle.remove()
    scaled = [x / x.max().abs() for x in inputs]  # peft divides by |max X| (not max |X|)
    cov = sum(x.T @ x for x in scaled) / len(scaled)
    damp = 0.01
    while True:
        fixed = cov + torch.eye(cov.shape[0]) * cov.diag().mean() * damp
        if torch.dist(fixed @ torch.linalg.inv(fixed), torch.eye(cov.shape[0])) < 0.05:
            return fixed
        damp *= 2


@pytest.mark.parametrize("mode", ["corda_kpm", "corda_ipm"])
def test_corda_init_keeps_the_function_and_picks_the_components(tok, mode):
    model = tiny_llama(len(tok), layers=2, hidden=32, seed=0)
    original = copy.deepcopy(model)
    calib = _calibration(len(tok))
    cfg = LoraConfig(r=4, alpha=8.0, init=mode)
    wrapped = apply_corda(model, cfg, calib, log=lambda _m: None)
    ids_bt = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(wrapped(input_ids=ids_bt).logits, original(input_ids=ids_bt).logits, atol=1e-4)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    layer = wrapped.base_model.model.get_submodule(LAYER)
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    w = original.get_submodule(LAYER).weight.detach()
    assert torch.allclose(layer.base_layer.weight + delta, w, atol=1e-5)  # residual + BA = W
    cov = _damped_covariance(original, calib)
    s_all = torch.linalg.svdvals(w @ cov)
    s_adapter = torch.linalg.svdvals(delta.detach() @ cov)[: cfg.r]
    expect = s_all[-cfg.r:] if mode == "corda_kpm" else s_all[: cfg.r]
    assert torch.allclose(s_adapter.sort().values, expect.sort().values, rtol=1e-3, atol=1e-5)

    merged = merge_lora(wrapped)
    for name, p in original.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], p, atol=1e-5), name


def test_corda_refuses_unknown_targets(tok):
    model = tiny_llama(len(tok), layers=1, hidden=16, seed=0)
    with pytest.raises(ValueError, match="matches no linear layer.*available"):
        apply_corda(model, LoraConfig(r=2, init="corda_kpm", target_modules=["c_attn"]), _calibration(len(tok)),
                    log=lambda _m: None)
