"""Zero-shot classification by class-name prompts: an image-text model as a classifier teacher.

Each class ``c`` has a phrase (``"the digit three"``); every template (``"a photo of {}."``) is filled with
it, the prompts' L2-normalised text features are averaged over the templates and normalised again (CLIP's
prompt ensembling), giving class weights ``W`` ``[C, D]``. Logits of an image are
``logit_scale * cos(image, W_c)`` ``[B, C]``. The weights are computed once when the classifier is built
(no grad: the text tower is not trained through it) and kept on the model's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stillroom.domains.vl.clip_model import ImageText


def class_weights(model: ImageText, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """``[C, D]`` the normalised template-averaged text features of each class phrase (see the module docstring);
    a class without a phrase, or no template, is refused naming it."""
    missing = [i for i, name in enumerate(class_names) if not isinstance(name, str) or not name.strip()]
    if missing:
        raise ValueError(f"zero-shot classifier: class(es) {missing} have no prompt phrase: give every class one")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"zero-shot classifier: templates {templates} must be non-empty, each with one '{{}}'")
    prompts = [t.format(name) for name in class_names for t in templates]
    with torch.no_grad():
        text_ctd = model.text_features(prompts).view(len(class_names), len(templates), -1)
    return F.normalize(text_ctd.mean(1), dim=-1)


class ZeroShotClassifier(nn.Module):
    """``pixels [B, C_in, H, W] in [0, 1] -> logits [B, C]`` of an image-text model (module docstring)."""

    def __init__(self, model: ImageText, class_names: list[str], templates: list[str]):
        super().__init__()
        self.model, self.class_names, self.templates = model, list(class_names), list(templates)
        self.register_buffer("weights_cd", class_weights(model, class_names, templates), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, pixels_bchw: torch.Tensor) -> torch.Tensor:
        image_bd = self.model.image_features(pixels_bchw)
        return self.model.logit_scale * image_bd @ self.weights_cd.to(image_bd.dtype).T

    def describe(self) -> str:
        return f"zero-shot CLIP over {self.num_classes} class prompts x {len(self.templates)} templates"

