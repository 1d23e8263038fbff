"""Depth pruning: block influence by hand, the three strategies' choices, reload, and refused targets."""

import pytest
import torch
from helpers import tiny_llama
from transformers import AutoModelForCausalLM

from stillroom.compress.depth import PruneTargetError, block_influence, layers_to_keep, prune_depth
from stillroom.config.prune import DepthPrune
from stillroom.models.derive import layer_boundary_states


@pytest.fixture
def calib(tok):
    torch.manual_seed(3)
    return [torch.randint(0, len(tok), (2, 10)) for _ in range(2)]


def _silence(model, layer: int) -> None:
    """Make a layer the identity map (zero attention and MLP outputs): its BI is 0."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()


def test_block_influence_matches_a_hand_computation(tok, calib):
    model = tiny_llama(len(tok), layers=4)
    bi = block_influence(model, calib)
    states = list(layer_boundary_states(model, calib))
    for l in (0, 3):
        cos = torch.cat([torch.nn.functional.cosine_similarity(hs[l].double(), hs[l + 1].double(), dim=-1)
                         for hs in states])
        assert bi[l] == pytest.approx(1 - cos.mean().item(), abs=1e-9)


def test_block_influence_drops_identity_layers_anywhere(tok, calib):
    model = tiny_llama(len(tok), layers=5)
    _silence(model, 0)
    _silence(model, 3)
    keep, scores = layers_to_keep(model, DepthPrune(strategy="block_influence", num_layers=3), calib)
    assert keep == [1, 2, 4]
    assert scores["block_influence"][0] == pytest.approx(0, abs=1e-9)


def test_last_n_and_angular(tok, calib):
    model = tiny_llama(len(tok), layers=5)
    assert layers_to_keep(model, DepthPrune(strategy="last_n", num_layers=2), None)[0] == [0, 1]
    _silence(model, 2)
    _silence(model, 3)
    keep, _ = layers_to_keep(model, DepthPrune(strategy="angular", num_layers=3), calib)
    assert keep == [0, 1, 4]


def test_pruned_model_reloads_and_equals_skipping_identity_layers(tok, calib, tmp_path):
    model = tiny_llama(len(tok), layers=4)
    _silence(model, 1)
    pruned, kept, _ = prune_depth(model, DepthPrune(strategy="block_influence", num_layers=3), calib)
    assert kept == [0, 2, 3] and pruned.config.num_hidden_layers == 3
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = calib[0]
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg, match", [
    (DepthPrune(strategy="last_n", num_layers=9), "num_layers=9 but the model has 4"),
    (DepthPrune(strategy="angular", num_layers=1), "needs >= 2"),
])
def test_impossible_targets_are_refused(tok, cfg, match):
    with pytest.raises(PruneTargetError, match=match):
        layers_to_keep(tiny_llama(len(tok), layers=4), cfg, None)
