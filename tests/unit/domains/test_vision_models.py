"""Classifiers from config: shapes, seeded builds, and the safetensors + config.json round trip."""

import json

import pytest
import torch

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.forward import ClassifierForward, ClassifierTeacher
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.models import build_classifier, load_classifier, read_config, save_classifier

ARCHS = [ClassifierArch(kind="mlp", hidden=[16, 8]), ClassifierArch(kind="mlp", hidden=[]),
         ClassifierArch(kind="cnn", channels=[4, 8, 8], dropout=0.1)]


@pytest.mark.parametrize("arch", ARCHS, ids=["mlp", "linear", "cnn"])
def test_save_load_round_trip(tmp_path, arch):
    model = build_classifier(arch, (1, 8, 8), 10, seed=3)
    x = torch.rand(5, 1, 8, 8)
    assert model(x).shape == (5, 10)
    save_classifier(model, tmp_path / "m", extra={"classes": list("0123456789")})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["in_shape"] == [1, 8, 8] and config["arch"]["kind"] == arch.kind
    loaded = load_classifier(tmp_path / "m")
    model.eval()
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    save_classifier(loaded, tmp_path / "m")  # overwrites in place, atomically
    assert not list(tmp_path.glob(".tmp-m-*"))


def test_builds_are_seeded_and_leave_the_global_rng_alone():
    arch = ClassifierArch(kind="mlp", hidden=[8])
    state = torch.get_rng_state()
    a, b = build_classifier(arch, (1, 8, 8), 10, seed=1), build_classifier(arch, (1, 8, 8), 10, seed=1)
    c = build_classifier(arch, (1, 8, 8), 10, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layers[1].weight, c.layers[1].weight)


def test_cnn_pools_down_to_two_by_two():
    model = build_classifier(ClassifierArch(kind="cnn", channels=[4, 6, 5]), (1, 8, 8), 3, seed=0)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.layers) == 2
    assert model.layers[-1].in_features == 5 * 2 * 2


def test_not_a_classifier_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved classifier"):
        read_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a stillroom classifier"):
        read_config(tmp_path)


def test_forward_and_teacher_signal_shapes():
    model = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 10, seed=0)
    batch = ImageBatch(torch.rand(3, 1, 8, 8), torch.tensor([[1], [2], [3]]), ["a", "b", "c"])
    assert ClassifierForward(model)(batch)["logits"].shape == (3, 1, 10)
    signal = ClassifierTeacher(model).signal(batch)
    assert signal.logits_btv.shape == (3, 1, 10) and not signal.logits_btv.requires_grad
