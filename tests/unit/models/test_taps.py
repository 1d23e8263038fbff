"""FeatureTap: named activations by hooks and aliases, hooks removed on exit, and the truncated forward
(same activations as the full forward, fewer blocks run)."""

import pytest
import torch
from helpers import tiny_llama

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.models import build_classifier
from stillroom.models.taps import FeatureTap, resolve_tap


def _vit(layers=4):
    return build_classifier(ClassifierArch(kind="vit", layers=layers), (1, 8, 8), 10, seed=0).eval()


def _count_calls(modules):
    """Forward hooks counting each module's calls (the test's own hooks, removed by the caller)."""
    calls = {"n": 0}
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1)) for m in modules]
    return calls, handles


def test_llama_block_taps_equal_output_hidden_states():
    model = tiny_llama(64, layers=4, seed=0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FeatureTap(model, ["block.0", "block.2", "block.3"]) as tap:
        taps = tap(input_ids=ids)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(taps["block.0"], hidden[1]) and torch.equal(taps["block.2"], hidden[3])
    # the last hidden state has the final norm applied; the block's own output does not
    assert torch.allclose(model.model.norm(taps["block.3"]), hidden[4], atol=1e-6)
    assert not torch.allclose(taps["block.3"], hidden[4])


def test_aliases_resolve_to_named_modules():
    vit = _vit()
    assert resolve_tap(vit, "block.1")[0] == "model.vit.layers.1"
    resnet = build_classifier(ClassifierArch(kind="resnet"), (1, 8, 8), 10, seed=0)
    assert resolve_tap(resnet, "stage.1")[0] == "model.resnet.encoder.stages.1"
    convnext = build_classifier(ClassifierArch(kind="convnext"), (1, 8, 8), 10, seed=0)
    assert resolve_tap(convnext, "stage.0")[0] == "model.convnext.encoder.stages.0"
    cnn = build_classifier(ClassifierArch(kind="cnn", channels=[4, 6]), (1, 8, 8), 10, seed=0)
    assert [resolve_tap(cnn, f"layer.{i}")[0] for i in range(3)] == ["layers.0", "layers.3", "layers.7"]
    with pytest.raises(ValueError, match=r"has 4 blocks \(block.0 .. block.3\)"):
        resolve_tap(vit, "block.4")
    with pytest.raises(ValueError, match="names no submodule"):
        resolve_tap(cnn, "stage.0")


def test_stage_and_layer_taps_have_the_expected_shapes():
    x = torch.rand(3, 1, 8, 8)
    resnet = build_classifier(ClassifierArch(kind="resnet", widths=[8, 12], depths=[1, 1]), (1, 8, 8), 10, seed=0)
    with FeatureTap(resnet, ["stage.0", "stage.1"]) as tap:
        taps = tap(x)
    assert taps["stage.0"].shape == (3, 8, 2, 2) and taps["stage.1"].shape == (3, 12, 1, 1)
    mlp = build_classifier(ClassifierArch(kind="mlp", hidden=[16, 8]), (1, 8, 8), 10, seed=0)
    with FeatureTap(mlp, ["layer.1", "layers.4"]) as tap:
        taps = tap(x)
    assert taps["layer.1"].shape == (3, 8) and torch.equal(taps["layers.4"], taps["layer.1"].relu())


def test_truncated_forward_matches_and_runs_fewer_blocks():
    vit = _vit(layers=4)
    x = torch.rand(2, 1, 8, 8)
    blocks = list(vit.model.vit.layers)
    calls, handles = _count_calls(blocks + [vit.model.classifier])
    with torch.no_grad(), FeatureTap(vit, ["block.0", "block.1"]) as tap:
        full = tap(x)
        full_calls, calls["n"] = calls["n"], 0
        cut = tap.truncated(x)
    for h in handles:
        h.remove()
    assert full_calls == 5 and calls["n"] == 2  # blocks 0 and 1 only: neither blocks 2, 3 nor the head ran
    assert full["block.1"].shape == (2, 17, 32)  # [CLS] + 16 patches
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_truncated_forward_of_a_causal_lm():
    model = tiny_llama(64, layers=4, seed=0)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    calls, handles = _count_calls(list(model.model.layers))
    with torch.no_grad(), FeatureTap(model, ["block.1"]) as tap:
        cut = tap.truncated(input_ids=ids)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    assert torch.equal(cut["block.1"], hidden[2])
    assert calls["n"] == 2 + 4  # the truncated forward ran 2 blocks, the full one 4


def test_hooks_are_removed_on_exit_and_gradients_flow():
    mlp = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 10, seed=0)
    with FeatureTap(mlp, ["layer.0"]) as tap:
        taps = tap(torch.rand(2, 1, 8, 8))
        taps["layer.0"].sum().backward()
    assert mlp.layers[1].weight.grad is not None
    assert not mlp.layers[1]._forward_hooks
    with pytest.raises(ValueError, match="at least one"):
        FeatureTap(mlp, [])
