"""The ``clip`` domain's report metrics, per held-out data set.

* ``zero_shot_<set>``: accuracy of zero-shot classification from class-name prompts averaged over the
  templates (:class:`~.zero_shot.ZeroShotClassifier`), class data sets only; ``ece_<set>``: its expected
  calibration error (top-1 confidence, 15 bins, as the classifier domain's);
* ``recall1_<set>``: image->text recall@1 over the first ``clip.retrieval_images`` held-out images of the set,
  each ranked against the set's distinct captions (a hit: the top caption is the image's own caption; in a class
  set, whose captions are the class phrase in several templates, any caption of the image's class);
* ``zero_shot_mean`` / ``recall1_mean`` over the sets that have them; parameters; images/s of the image tower.
"""

from __future__ import annotations

import torch

from stillroom.domains.vision.metrics import expected_calibration_error, images_per_s
from stillroom.domains.vl.clip_data import EvalSet
from stillroom.domains.vl.clip_model import ImageTextModel
from stillroom.domains.vl.zero_shot import ZeroShotClassifier


@torch.no_grad()
def image_features(model: ImageTextModel, images_nchw: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[N, D]`` normalised image features, ``batch_size`` at a time (on the model's device)."""
    return torch.cat([model.image_features(images_nchw[i: i + batch_size]) for i in range(0, len(images_nchw),
                                                                                           batch_size)])


@torch.no_grad()
def text_features(model: ImageTextModel, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([model.text_features(texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)])


def zero_shot_logits(model: ImageTextModel, s: EvalSet, templates: list[str],
                     batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C], labels [N])`` of zero-shot classification of a class data set's held-out images (CPU)."""
    classifier = ZeroShotClassifier(model, s.phrases, templates)
    images = torch.stack([e.image for e in s.examples])
    with torch.no_grad():
        logits = torch.cat([classifier(images[i: i + batch_size]).float().cpu()
                            for i in range(0, len(images), batch_size)])
    return logits, torch.tensor([e.label for e in s.examples])


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor, name: str) -> dict[str, float]:
    """``{zero_shot_<set>, ece_<set>}``."""
    return {f"zero_shot_{name}": float((logits.argmax(-1) == labels).float().mean()),
            f"ece_{name}": expected_calibration_error(logits, labels)}


def recall_at_1(model: ImageTextModel, s: EvalSet, limit: int, batch_size: int) -> float:
    """Image->text recall@1 of the first ``limit`` images against the set's distinct captions: a hit is the image's
    own caption, or, in a class set (whose captions are its class phrase in several templates), any caption of
    its class."""
    examples = s.examples[:limit]
    captions = sorted({e.caption for e in examples})
    owner = {e.caption: (e.label if s.phrases is not None else e.caption) for e in examples}
    image_nd = image_features(model, torch.stack([e.image for e in examples]), batch_size)
    text_cd = text_features(model, captions, batch_size)
    best = (image_nd @ text_cd.T).argmax(-1).cpu().tolist()
    hits = [owner[captions[b]] == (e.label if s.phrases is not None else e.caption) for b, e in zip(best, examples)]
    return sum(hits) / len(hits)


def clip_metrics(model: ImageTextModel, sets: dict[str, EvalSet], *, templates: list[str], retrieval_images: int,
                 batch_size: int, curves: dict | None = None) -> dict[str, float]:
    """The row of one model (see the module docstring); the model's train/eval mode is restored. ``curves``: filled
    with ``set name -> (zero-shot logits, labels)`` (the reliability diagrams' data)."""
    was = model.training
    model.eval()
    row: dict[str, float] = {}
    for s in sets.values():
        if not s.examples:
            continue
        if s.phrases is not None:
            logits, labels = zero_shot_logits(model, s, templates, batch_size)
            row.update(zero_shot_metrics(logits, labels, s.name))
            if curves is not None:
                curves[s.name] = (logits, labels)
        row[f"recall1_{s.name}"] = recall_at_1(model, s, retrieval_images, batch_size)
    zs = [v for k, v in row.items() if k.startswith("zero_shot_")]
    r1 = [v for k, v in row.items() if k.startswith("recall1_")]
    if zs:
        row["zero_shot_mean"] = sum(zs) / len(zs)
    row["recall1_mean"] = sum(r1) / len(r1)
    first = next(s for s in sets.values() if s.examples)
    batch = torch.stack([e.image for e in first.examples[:batch_size]])
    row["images_per_s"] = images_per_s(_ImageTower(model), batch, device=model.device)
    row["params"] = sum(p.numel() for p in model.parameters())
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["examples"] = sum(len(s.examples) for s in sets.values())
    model.train(was)
    return row


class _ImageTower(torch.nn.Module):
    """The image side alone, for the images/s measurement."""

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_features(pixels)
