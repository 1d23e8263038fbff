"""Few-class tasks: a data set's classes grouped into fewer classes (``classifier.class_groups``).

LELP (:mod:`stillroom.methods.lelp`) is about tasks with few classes, where the teacher's soft labels carry
little dark knowledge; grouping the ten digits into ``even`` / ``odd`` makes such a task whose hidden
structure (the digit) is known. The grouping is one step where the splits are built
(:func:`stillroom.domains.vision.data.build_image_splits`): it relabels the whole :class:`ImageSet` (and its
domain-shifted set), so the teacher trained here, its cache key (the labels are in the data fingerprint),
the students and the report all see the grouped classes. The original label of every image is kept as
``fine_labels`` ``[N]`` and reaches each :class:`~.data.ImageExample` as ``fine_label`` (diagnostics: how
well LELP's subclasses recover the digits).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from stillroom.domains.vision.datasets import ImageSet

NAMED_NAMES = {"parity": ["even", "odd"], "halves": ["low", "high"]}
"""Default class names of the named groupings."""


def resolve_groups(groups: list[list[int]] | str, num_classes: int) -> list[list[int]]:
    """The fine class indices of each group: a named grouping expanded for ``num_classes`` classes, or
    ``groups`` as given, checked to cover every class ``0..num_classes-1`` exactly once."""
    if groups == "parity":
        return [list(range(0, num_classes, 2)), list(range(1, num_classes, 2))]
    if groups == "halves":
        half = (num_classes + 1) // 2
        return [list(range(half)), list(range(half, num_classes))]
    flat = sorted(c for g in groups for c in g)
    if flat != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(flat))
        extra = sorted(set(flat) - set(range(num_classes)))
        raise ValueError(f"classifier.class_groups={groups} must put each of the data set's {num_classes} classes "
                         f"(0..{num_classes - 1}) in exactly one group; missing {missing}, unknown {extra}")
    return [list(g) for g in groups]


def group_names(groups: list[list[int]], named: str | None, names: list[str] | None, fine: list[str]) -> list[str]:
    """``names``, else the named grouping's, else each group's fine class names joined by ``+``."""
    if names is not None:
        return list(names)
    if named is not None:
        return list(NAMED_NAMES[named])
    return ["+".join(fine[c] for c in g) for g in groups]


def coarse_of(groups: list[list[int]], num_classes: int) -> torch.Tensor:
    """``[num_classes]`` int64: the group of every fine class."""
    table = torch.empty(num_classes, dtype=torch.long)
    for index, group in enumerate(groups):
        table[group] = index
    return table


def group_classes(ds: ImageSet, groups: list[list[int]] | str | None,
                  names: list[str] | None = None) -> tuple[ImageSet, torch.Tensor, list[str]]:
    """``(ds relabelled to the groups, fine labels [N] int64, fine class names)``; ``groups`` ``None``: ``ds``
    unchanged, its labels as the fine labels. The domain-shifted set (if any) is relabelled alike."""
    if groups is None:
        return ds, ds.labels, list(ds.classes)
    resolved = resolve_groups(groups, ds.num_classes)
    named = groups if isinstance(groups, str) else None
    table = coarse_of(resolved, ds.num_classes)
    classes = group_names(resolved, named, names, ds.classes)
    shifted = None if ds.shifted is None else group_classes(ds.shifted, resolved, classes)[0]
    grouped = replace(ds, labels=table[ds.labels], classes=classes, shifted=shifted)
    return grouped, ds.labels, list(ds.classes)


def describe_groups(groups: list[list[int]] | str, fine: list[str], coarse: list[str]) -> str:
    """The report's line, e.g. ``classes grouped (parity): even = 0, 2, 4, 6, 8; odd = 1, 3, 5, 7, 9``."""
    resolved = resolve_groups(groups, len(fine))
    how = f" ({groups})" if isinstance(groups, str) else ""
    parts = [f"{name} = {', '.join(fine[c] for c in g)}" for name, g in zip(coarse, resolved)]
    return f"data: classes grouped{how} into {len(coarse)}: {'; '.join(parts)}; each image keeps its fine label"
