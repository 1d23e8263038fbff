"""Evaluating a representation: a linear probe on frozen encoder features, and an MAE encoder as a classifier.

:func:`linear_probe` fits scikit-learn's ``LogisticRegression`` (L2, lbfgs) on the frozen, mean-pooled
patch tokens of the unmasked training images (:func:`encoder_features`; standardised with the training
features' mean and deviation) and returns the held-out accuracy: what the spec's experiments call the
linear probe (spec 1.7 (i)).

:func:`mae_to_classifier` turns a ``ViTMAEForPreTraining`` encoder into a ``ViTForImageClassification``
wrapped as the classifier domain's :class:`~.hf_models.HFClassifier`: transformers names both encoders'
weights alike (``vit.embeddings.*``, ``vit.layers.<i>.*``, ``vit.layernorm.*``), so the mapping is the
identity on ``vit.*`` (:data:`ENCODER_PREFIX`); the decoder is dropped and the classification head
(on the [CLS] token) starts from a seeded initialisation. Saved with
:func:`~.models.save_classifier`, the folder is what ``classifier.student_path`` loads: the encoder is
then fine-tuned on few labels (``classifier.train_images_per_class``) by an ordinary ``stillroom run``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stillroom.config.domains import ClassifierArch
from stillroom.domains.vision.datasets import first_per_class
from stillroom.domains.vision.hf_models import HFClassifier, build_hf_classifier
from stillroom.domains.vision.mae import ENCODER_PREFIX, encode_unmasked


@torch.no_grad()
def encoder_features(model: nn.Module, images_nchw: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[N, d]``: the mean over patch tokens (not [CLS]) of the final-layernormed encoder output on the whole,
    unmasked images (eval mode; fp32 on the CPU)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [encode_unmasked(model, images_nchw[i:i + batch_size].to(device))[:, 1:].mean(1).float().cpu()
           for i in range(0, len(images_nchw), batch_size)]
    model.train(was)
    return torch.cat(out)


def linear_probe(model: nn.Module, train: list, heldout: list, *, c: float = 1.0, max_iter: int = 1000,
                 images_per_class: int | None = None, batch_size: int = 256) -> float:
    """Held-out accuracy of a logistic regression on frozen :func:`encoder_features` of ``train`` (examples with
    ``.image`` ``[C, H, W]`` and ``.label``; the first ``images_per_class`` of each class when given)."""
    from sklearn.linear_model import LogisticRegression

    y_train = np.array([e.label for e in train])
    keep = first_per_class(torch.from_numpy(y_train).long(), torch.arange(len(train)), images_per_class).numpy()
    x_train = encoder_features(model, torch.stack([train[i].image for i in keep]), batch_size).numpy()
    x_held = encoder_features(model, torch.stack([e.image for e in heldout]), batch_size).numpy()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = LogisticRegression(C=c, max_iter=max_iter)
    probe.fit((x_train - mean) / std, y_train[keep])
    predicted = probe.predict((x_held - mean) / std)
    return float((predicted == np.array([e.label for e in heldout])).mean())


def vit_arch_of(mae: nn.Module) -> ClassifierArch:
    """The classifier domain's ``vit`` arch with the MAE encoder's sizes (its MLP must be 4x wide, as both build)."""
    c = mae.config
    if c.intermediate_size != 4 * c.hidden_size:
        raise ValueError(f"the MAE encoder's intermediate_size {c.intermediate_size} is not 4 x hidden_size "
                         f"{c.hidden_size}: the classifier domain's vit arch cannot hold it")
    return ClassifierArch(kind="vit", patch_size=c.patch_size, hidden_size=c.hidden_size, layers=c.num_hidden_layers,
                          heads=c.num_attention_heads)


def mae_to_classifier(mae: nn.Module, num_classes: int, *, seed: int = 0) -> HFClassifier:
    """A :class:`HFClassifier` (``ViTForImageClassification``) holding ``mae``'s encoder weights (see the module
    docstring); the head is initialised from ``seed`` (global RNG untouched)."""
    c = mae.config
    in_shape = (c.num_channels, c.image_size, c.image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = build_hf_classifier(vit_arch_of(mae), in_shape, num_classes)
    encoder = {k: v for k, v in mae.state_dict().items() if k.startswith(ENCODER_PREFIX)}
    target = classifier.model.state_dict()
    missing = sorted(k for k in target if k.startswith(ENCODER_PREFIX) and k not in encoder)
    if missing or any(encoder[k].shape != target[k].shape for k in encoder if k in target):
        raise ValueError(f"the MAE encoder does not map onto a ViT classifier (missing {missing[:3]})")
    unused = sorted(set(encoder) - set(target))
    if unused:
        raise ValueError(f"MAE encoder weights {unused[:3]} have no place in the ViT classifier")
    classifier.model.load_state_dict({**target, **encoder})
    return classifier
