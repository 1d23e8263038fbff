"""What OGEN reads of the run before step 0 (:func:`ogen_data`): classes, shots, frozen features, the generator.

From the frozen CLIP (the run's model) and the ``clip`` domain's data: the class phrases of ``ogen.dataset``,
its base / new split, ``ogen.shots`` training images of each base class (a seeded draw from the run's seed),
the template-averaged class text features ``[C, D]``, the unknown classes' text features ``[U, D]``, the frozen
image features of the shots per base class (the generator's bank) and of the data set's held-out images (the
metrics), and the leave-one-class-out trained generator. The CLIP is frozen and in eval mode, so these
features are exactly what the tower gives at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from stillroom.data.seeds import derive_seed
from stillroom.domains.vl.zero_shot import class_weights
from stillroom.methods.ogen_parts import FeatureGenerator, train_generator


@dataclass
class OgenData:
    base: list[int]
    new: list[int]
    text_cd: torch.Tensor
    unknown_ud: torch.Tensor
    shot_indices: list[int]
    """Indices into the run's training examples."""
    bank: list[torch.Tensor]
    """Per base class (in ``base`` order): the shots' image features ``[N_c, D]``."""
    heldout_nd: torch.Tensor
    heldout_labels: torch.Tensor
    generator: FeatureGenerator | None = None
    generator_loss: list[float] = field(default_factory=list)


def split_classes(num_classes: int, base: list[int] | None) -> tuple[list[int], list[int]]:
    """``(base, new)`` class indices; a base index beyond the data set is refused naming the key."""
    base = list(base) if base is not None else list(range(num_classes // 2))
    bad = [c for c in base if c >= num_classes]
    if bad:
        raise ValueError(f"ogen.base_classes has {bad}, but the data set has classes 0..{num_classes - 1}")
    new = [c for c in range(num_classes) if c not in base]
    if not new:
        raise ValueError("ogen.base_classes covers every class: leave at least one new class")
    return base, new


def draw_shots(examples: list, dataset: str, base: list[int], shots: int, seed: int) -> list[int]:
    """``shots`` indices of ``examples`` per base class of ``dataset``, a seeded draw; too few images is an error."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "ogen-shots"))
    out = []
    for c in base:
        pool = [i for i, e in enumerate(examples) if e.dataset == dataset and e.label == c]
        if len(pool) < shots:
            raise ValueError(f"ogen.shots={shots}, but class {c} of {dataset} has {len(pool)} training images: lower "
                             "ogen.shots or raise clip.images_per_class")
        out += [pool[i] for i in torch.randperm(len(pool), generator=gen)[:shots].tolist()]
    return out


@torch.no_grad()
def features(clip, images: list[torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """``[N, D]`` frozen image features (fp32, on the CPU)."""
    stacked = torch.stack(images)
    return torch.cat([clip.image_features(stacked[i: i + batch_size]).float().cpu()
                      for i in range(0, len(stacked), batch_size)])


def ogen_data(clip, data, s, templates: list[str], *, seed: int, log: Callable[[str], None]) -> OgenData:
    """Everything of the module docstring (``s``: the ``ogen`` section, ``data``: the clip domain's splits)."""
    if s.dataset not in data.train_sets:
        raise ValueError(f"ogen.dataset={s.dataset} is not among the run's class data sets {list(data.train_sets)}")
    classes, phrases = data.train_sets[s.dataset]
    base, new = split_classes(len(classes), s.base_classes)
    was = clip.training
    clip.eval()
    text_cd = class_weights(clip, phrases, templates).float().cpu()
    names = s.unknown_names or [phrases[c] for c in new]
    unknown_ud = class_weights(clip, names, templates).float().cpu()
    shot_indices = draw_shots(data.train, s.dataset, base, s.shots, seed)
    shot_nd = features(clip, [data.train[i].image for i in shot_indices])
    bank = [shot_nd[k * s.shots:(k + 1) * s.shots] for k in range(len(base))]
    held = data.sets[s.dataset].examples
    heldout_nd = features(clip, [e.image for e in held])
    clip.train(was)
    generator, losses = None, []
    if s.synthesis:
        generator, losses = train_generator(text_cd[base], bank, s.k_nn, s.generator_steps, s.generator_lr,
                                            derive_seed(seed, "ogen-generator"))
        log(f"ogen: generator trained leave-one-class-out for {s.generator_steps} steps, 1 - cos "
            f"{losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f}; unknown classes: {', '.join(names)}")
    return OgenData(base, new, text_cd, unknown_ud, shot_indices, bank, heldout_nd,
                    torch.tensor([e.label for e in held]), generator, losses)
