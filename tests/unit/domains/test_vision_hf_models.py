"""Classifiers from transformers' vision classes: built from tiny configs on each image size, saved as Hugging
Face folders that transformers loads alone, refused before training when they cannot take the images; the
ViTMAE builder; the reliability diagram's bins against torchmetrics' ECE."""

import json

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForImageClassification

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.hf_models import HFClassifier, build_vit_mae
from stillroom.domains.vision.metrics import expected_calibration_error, reliability_bins
from stillroom.domains.vision.models import arch_json, build_classifier, load_classifier, save_classifier
from stillroom.eval.plots import plot_reliability
from stillroom.models.taps import FeatureTap

KINDS = ("vit", "resnet", "convnext", "mobilevit")
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 16, 16), (3, 32, 32)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_default_sizes_build_on_every_image_size(kind, shape):
    model = build_classifier(ClassifierArch(kind=kind), shape, 10, seed=0)
    assert isinstance(model, HFClassifier)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_loads_with_transformers_alone(tmp_path, kind):
    model = build_classifier(ClassifierArch(kind=kind), (1, 8, 8), 10, seed=4).eval()
    x = torch.rand(3, 1, 8, 8)
    save_classifier(model, tmp_path / "m", extra={"classes": [f"c{i}" for i in range(10)]})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(plain(pixel_values=(x - 0.5) / 0.5).logits, model(x), atol=1e-6)
    assert plain.config.id2label[3] == "c3"
    loaded = load_classifier(tmp_path / "m")
    assert isinstance(loaded, HFClassifier) and not loaded.training and loaded.arch.own_fields() == model.arch.own_fields()
    assert torch.equal(loaded(x), model(x))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["stillroom"]["arch"] == arch_json(model.arch) and config["stillroom"]["in_shape"] == [1, 8, 8]
    save_classifier(loaded, tmp_path / "m")  # overwrites in place
    assert not list(tmp_path.glob(".tmp-m-*")) and not (tmp_path / "m" / ".hf-save").exists()


def test_builds_are_seeded():
    arch = ClassifierArch(kind="vit", hidden_size=16, layers=1)
    a, b = (build_classifier(arch, (1, 8, 8), 10, seed=1) for _ in range(2))
    c = build_classifier(arch, (1, 8, 8), 10, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.describe().startswith("vit {patch_size 2, hidden_size 16, layers 1, heads 2} (")


def test_images_that_do_not_fit_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"classifier.student.patch_size=3 does not divide the 8x8 images"):
        build_classifier(ClassifierArch(kind="vit", patch_size=3), (1, 8, 8), 10, seed=0)
    with pytest.raises(ValueError, match=r"classifier.teacher.arch: a convnext with patch_size 4 and 3 stages"):
        build_classifier(ClassifierArch(kind="convnext", patch_size=4, widths=[4, 4, 4], depths=[1, 1, 1]),
                         (1, 8, 8), 10, seed=0, where="classifier.teacher.arch")
    build_classifier(ClassifierArch(kind="convnext", patch_size=4, widths=[4, 4, 4], depths=[1, 1, 1]),
                     (1, 16, 16), 10, seed=0)


@pytest.mark.parametrize("fields, message", [
    ({"kind": "resnet", "hidden_size": 8}, "`hidden_size` is set, but kind is 'resnet': it is used only by kind vit"),
    ({"kind": "mlp", "widths": [4]}, "used only by kind resnet / convnext / mobilevit"),
    ({"kind": "convnext", "widths": [4, 8], "depths": [1]}, "one `depths` entry per `widths` entry"),
    ({"kind": "vit", "hidden_size": 10, "heads": 4}, r"`hidden_size` \[10\] must be multiples of `heads` \(4\)"),
    ({"kind": "mobilevit", "widths": [8, 8]}, "3 `widths`"),
    ({"kind": "resnet", "depths": [0, 1]}, "every entry of `depths` must be >= 1"),
])
def test_bad_arch_fields_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        ClassifierArch(**fields)


def test_arch_json_fills_in_the_kinds_defaults_and_keeps_old_keys():
    assert arch_json(ClassifierArch(kind="mlp", hidden=[256, 256])) == {"kind": "mlp", "hidden": [256, 256],
                                                                         "dropout": 0.0}
    assert arch_json(ClassifierArch(kind="cnn")) == {"kind": "cnn", "channels": [8, 16], "dropout": 0.0}
    assert arch_json(ClassifierArch(kind="vit")) == arch_json(ClassifierArch(kind="vit", patch_size=2, layers=2))
    assert arch_json(ClassifierArch(kind="vit")) != arch_json(ClassifierArch(kind="vit", layers=3))
    dumped = ClassifierArch(kind="resnet").model_dump()  # a full dump (other kinds' fields at defaults) loads
    assert ClassifierArch.model_validate(dumped).own_fields() == ClassifierArch(kind="resnet").own_fields()


def test_vit_mae_builds_and_exposes_its_blocks():
    mae = build_vit_mae((1, 8, 8), seed=0)
    again = build_vit_mae((1, 8, 8), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(mae.parameters(), again.parameters()))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    torch.manual_seed(0)
    out = mae(pixel_values=x)
    assert out.loss.ndim == 0 and out.mask.shape == (2, 16) and int(out.mask[0].sum()) == 12  # 75% masked
    with torch.no_grad(), FeatureTap(mae, ["block.1"]) as tap:
        torch.manual_seed(1)
        cut = tap.truncated(pixel_values=x)
    assert cut["block.1"].shape == (2, 1 + 4, 32)  # [CLS] + the 4 visible patches
    with pytest.raises(ValueError, match="must divide"):
        build_vit_mae((1, 8, 8), patch_size=3)


def test_reliability_bins_give_torchmetrics_ece(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 10, generator=g) * 3, torch.randint(0, 10, (300,), generator=g)
    bins = reliability_bins(logits, labels, n_bins=15)
    assert len(bins["accuracy"]) == len(bins["count"]) == 15 and len(bins["edges"]) == 16
    assert sum(bins["count"]) == 300
    ece = sum(c / 300 * abs(a - f) for a, f, c in zip(bins["accuracy"], bins["confidence"], bins["count"]))
    assert ece == pytest.approx(expected_calibration_error(logits, labels, n_bins=15), abs=1e-6)
    sure = reliability_bins(torch.tensor([[0.0, 200.0]]), torch.tensor([1]), n_bins=15)
    assert sure["count"][-1] == 1 and sure["accuracy"][-1] == 1.0  # confidence 1.0 lands in the last bin
    plot_reliability(tmp_path / "r.png", {"teacher": bins, "student_after": bins}, {"teacher": ece}, "t")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
