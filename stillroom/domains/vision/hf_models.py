"""Image classifiers from transformers' vision classes, built from small configs (nothing is downloaded).

``ClassifierArch.kind`` ``vit`` / ``resnet`` / ``convnext`` / ``mobilevit`` builds
``ViT/ResNet/ConvNext/MobileViTForImageClassification`` from the arch's size fields and the data set's
image shape. :class:`HFClassifier` keeps the domain's contract (images ``[B, C, H, W]`` float in
``[0, 1]`` -> logits ``[B, num_classes]``) and normalises inside: ``pixel_values = (images - 0.5) / 0.5``
(the ``[-1, 1]`` range of HF image processors with mean = std = 0.5), so the data path stays one for
every kind.

A saved folder is an ordinary Hugging Face folder (``save_pretrained``: ``config.json`` +
``model.safetensors``) that ``AutoModelForImageClassification.from_pretrained(folder)`` loads without
stillroom (feed it ``pixel_values`` normalised as above); its ``config.json`` also carries a
``stillroom`` entry (format, arch, image shape, class names) from which :func:`load_hf_classifier`
rebuilds the wrapper.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from stillroom.config.domains import ClassifierArch

HF_FORMAT = "stillroom-hf-classifier/1"
HF_KINDS = ("vit", "resnet", "convnext", "mobilevit")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
"""``pixel_values = (images - PIXEL_MEAN) / PIXEL_STD``: images in ``[0, 1]`` become ``[-1, 1]``."""


def check_fits(arch: ClassifierArch, in_shape: tuple[int, int, int], where: str) -> None:
    """Refuse (ValueError naming ``<where>.<field>``) an architecture that cannot take ``in_shape`` images:
    a vit patch that does not divide the image, a convnext whose stem and downsampling stages shrink the
    map below one pixel. resnet and mobilevit take any size (strided convs pad; mobilevit resizes maps to
    a multiple of its patch before unfolding)."""
    _, h, w = in_shape
    patch = arch.setting("patch_size") if arch.kind in ("vit", "convnext") else None
    if patch is not None and (h % patch or w % patch):
        raise ValueError(f"{where}.patch_size={patch} does not divide the {h}x{w} images of the data set: "
                         f"choose a divisor of {h} and {w}")
    if arch.kind == "convnext":
        stages = len(arch.setting("widths"))
        if min(h, w) // patch < 2 ** (stages - 1):
            raise ValueError(f"{where}: a convnext with patch_size {patch} and {stages} stages (`widths`) needs "
                             f"images of at least {patch * 2 ** (stages - 1)} px a side, the data set's are "
                             f"{h}x{w}: lower {where}.patch_size or use fewer stages")


def hf_config(arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int,
              classes: list[str] | None = None):
    """The transformers config of ``arch`` for ``in_shape`` images and ``num_classes`` labels."""
    import transformers as tf

    c, h, w = in_shape
    names = classes or [str(i) for i in range(num_classes)]
    common = dict(num_channels=c, num_labels=num_classes, id2label=dict(enumerate(names)),
                  label2id={n: i for i, n in enumerate(names)})
    s = arch.setting
    if arch.kind == "vit":
        return tf.ViTConfig(image_size=(h, w), patch_size=s("patch_size"), hidden_size=s("hidden_size"),
                            num_hidden_layers=s("layers"), num_attention_heads=s("heads"),
                            intermediate_size=4 * s("hidden_size"), hidden_dropout_prob=arch.dropout,
                            attention_probs_dropout_prob=arch.dropout, **common)
    if arch.kind == "resnet":
        return tf.ResNetConfig(embedding_size=s("stem"), hidden_sizes=s("widths"), depths=s("depths"),
                               layer_type="basic", **common)
    if arch.kind == "convnext":
        return tf.ConvNextConfig(patch_size=s("patch_size"), hidden_sizes=s("widths"), depths=s("depths"),
                                 num_stages=len(s("widths")), **common)
    if arch.kind == "mobilevit":
        return tf.MobileViTConfig(image_size=max(h, w), patch_size=s("patch_size"), hidden_sizes=s("widths"),
                                  neck_hidden_sizes=s("neck"), num_attention_heads=s("heads"),
                                  hidden_dropout_prob=arch.dropout, classifier_dropout_prob=arch.dropout, **common)
    raise ValueError(f"classifier kind {arch.kind!r} is not a transformers model (those are {HF_KINDS})")


class HFClassifier(nn.Module):
    """``model`` (a transformers ``*ForImageClassification``): images ``[B, C, H, W]`` in ``[0, 1]`` ->
    logits ``[B, num_classes]``, normalised to ``[-1, 1]`` first (see the module docstring)."""

    def __init__(self, arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int, model: nn.Module):
        super().__init__()
        self.arch = arch
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        return self.model(pixel_values=(images - PIXEL_MEAN) / PIXEL_STD).logits

    def describe(self) -> str:
        """e.g. ``vit {patch_size 2, hidden_size 32, layers 2, heads 2} (27.4K params)``."""
        fields = ", ".join(f"{k} {v}" for k, v in self.arch.own_fields().items() if k not in ("kind", "dropout"))
        n = sum(p.numel() for p in self.parameters())
        return f"{self.arch.kind} {{{fields}}} ({n:,} params)"


def build_hf_classifier(arch: ClassifierArch, in_shape: tuple[int, int, int], num_classes: int) -> HFClassifier:
    """A new transformers classifier of ``arch`` (initialised from the current global RNG)."""
    import transformers as tf

    config = hf_config(arch, in_shape, num_classes)
    classes = {"vit": tf.ViTForImageClassification, "resnet": tf.ResNetForImageClassification,
               "convnext": tf.ConvNextForImageClassification, "mobilevit": tf.MobileViTForImageClassification}
    return HFClassifier(arch, in_shape, num_classes, classes[arch.kind](config))


def write_hf_classifier_files(model: HFClassifier, folder: Path, *, arch_fields: dict,
                              extra: dict | None = None) -> None:
    """``save_pretrained`` of ``model.model`` into the existing ``folder`` (``config.json`` +
    ``model.safetensors``, fsynced), its config carrying ``stillroom`` = format, arch, image shape and
    ``extra`` (e.g. ``classes``, which also become the config's ``id2label``)."""
    folder = Path(folder)
    config = model.model.config
    classes = (extra or {}).get("classes")
    if classes:
        config.id2label = dict(enumerate(classes))
        config.label2id = {n: i for i, n in enumerate(classes)}
    config.stillroom = {"format": HF_FORMAT, "arch": arch_fields, "in_shape": list(model.in_shape),
                        "num_classes": model.num_classes, **(extra or {})}
    tmp = folder / ".hf-save"
    with _quiet():
        model.model.save_pretrained(tmp, safe_serialization=True)
    for path in tmp.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(path, folder / path.name)
    shutil.rmtree(tmp)


def load_hf_classifier(folder: Path, saved: dict) -> HFClassifier:
    """The :class:`HFClassifier` in ``folder`` (``saved``: its config's ``stillroom`` entry), CPU, eval mode."""
    from transformers import AutoModelForImageClassification

    arch = ClassifierArch.model_validate(saved["arch"])
    with _quiet():
        model = AutoModelForImageClassification.from_pretrained(str(folder), dtype=torch.float32)
    return HFClassifier(arch, tuple(saved["in_shape"]), int(saved["num_classes"]), model).eval()


def build_vit_mae(in_shape: tuple[int, int, int], *, patch_size: int = 2, hidden_size: int = 32, layers: int = 2,
                  heads: int = 2, decoder_hidden_size: int = 32, decoder_layers: int = 1, decoder_heads: int = 2,
                  mask_ratio: float = 0.75, norm_pix_loss: bool = False, seed: int = 0):
    """A small ``ViTMAEForPreTraining`` (masked-autoencoder ViT: encoder on the visible patches, decoder
    reconstructing the masked ones' pixels) for ``in_shape`` ``(C, H, W)`` images, initialised from ``seed``
    (global RNG untouched). Not a classifier kind: it maps pixels to a reconstruction loss, not to logits
    (DMAE distils through its encoder blocks). Feed it ``pixel_values`` normalised like
    :class:`HFClassifier` does."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    c, h, w = in_shape
    if h != w or h % patch_size:
        raise ValueError(f"build_vit_mae: patch_size {patch_size} must divide square images (got {h}x{w})")
    config = ViTMAEConfig(image_size=h, patch_size=patch_size, num_channels=c, hidden_size=hidden_size,
                          num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden_size,
                          decoder_hidden_size=decoder_hidden_size, decoder_num_hidden_layers=decoder_layers,
                          decoder_num_attention_heads=decoder_heads, decoder_intermediate_size=4 * decoder_hidden_size,
                          mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTMAEForPreTraining(config)


@contextmanager
def _quiet():
    """transformers' progress bars off while saving or loading a tiny folder (they would fill the run log)."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()
