"""CoDSA's allocation policies: how a fixed synthetic volume is split over the classes.

Every policy returns one integer per class, summing exactly to ``volume`` (the comparison between policies
is at equal synthetic volume). ``counts[c]`` is the number of real training images of class ``c``.

* ``uniform``: ``v_c`` proportional to ``n_c`` (augmentation that keeps the data's class balance);
* ``inverse_frequency``: ``v_c`` proportional to ``1 / n_c``;
* ``to_balance``: water-filling: the largest level ``L`` with ``sum_c max(0, L - n_c) <= volume``, then
  ``v_c = max(0, L - n_c)``; the few left over go one each to the classes at the level, smallest ``n_c``
  first (then lower index). Minority classes are filled first; once every class is level the rest is shared
  equally;
* ``weak_regions``: ``v_c`` proportional to ``error_c + floor``: a reference model's cross-validated error on
  class ``c`` (:func:`cross_validated_errors`).

Proportional splits use largest-remainder rounding (floors, then +1 by the largest fractional part, ties to
the lower class index), so the result is deterministic.
"""

from __future__ import annotations

import numpy as np


def largest_remainder(weights: list[float], volume: int) -> list[int]:
    """``volume`` split proportionally to ``weights`` (non-negative, not all zero) into integers summing to it."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"allocation weights must be finite, non-negative and not all zero; got {weights}")
    exact = volume * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    order = sorted(range(len(w)), key=lambda c: (-(exact[c] - out[c]), c))
    for c in order[: volume - int(out.sum())]:
        out[c] += 1
    return [int(v) for v in out]


def water_fill(counts: list[int], volume: int) -> list[int]:
    """``to_balance`` (see the module docstring): raise the smallest classes toward a common level."""
    n = np.asarray(counts, dtype=np.int64)
    lo, hi = int(n.min()), int(n.max()) + volume  # fill(lo) = 0 <= volume < fill(hi + 1)
    fill = lambda level: int(np.maximum(0, level - n).sum())  # noqa: E731
    while lo < hi:  # the largest level whose fill fits in the volume
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fill(mid) <= volume else (lo, mid - 1)
    out = np.maximum(0, lo - n)
    level = sorted((int(n[c]), c) for c in range(len(n)) if n[c] <= lo)
    for _, c in level[: volume - int(out.sum())]:
        out[c] += 1
    return [int(v) for v in out]


def allocate(policy: str, counts: list[int], volume: int, *, errors: list[float] | None = None,
             floor: float = 0.0) -> list[int]:
    """Synthetic images per class under ``policy`` (``errors``: per-class error rates, for ``weak_regions``)."""
    if any(c < 1 for c in counts):
        raise ValueError(f"every class needs at least one real training image to be modelled; counts: {counts}")
    if policy == "uniform":
        return largest_remainder([float(c) for c in counts], volume)
    if policy == "inverse_frequency":
        return largest_remainder([1.0 / c for c in counts], volume)
    if policy == "to_balance":
        return water_fill(counts, volume)
    if policy == "weak_regions":
        if errors is None or len(errors) != len(counts):
            raise ValueError("weak_regions needs one error rate per class")
        return largest_remainder([e + floor for e in errors], volume)
    raise ValueError(f"unknown allocation policy {policy!r}; known: uniform, inverse_frequency, to_balance, "
                     "weak_regions")


def cross_validated_errors(features_nd: np.ndarray, labels_n: np.ndarray, num_classes: int, *, folds: int,
                           seed: int) -> list[float]:
    """Per-class error rate of a logistic regression on ``features_nd`` ``[N, D]`` (the PCA features of the real
    training images), each image predicted by a model fitted on the other folds (stratified, seeded): where a
    reference model is weak, without reading the run's held-out images. ``folds`` is capped by the smallest class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    smallest = int(np.bincount(labels_n, minlength=num_classes).min())
    k = min(folds, smallest)
    if k < 2:
        raise ValueError(f"codsa.policy=weak_regions cross-validates over the real training images, but a class has "
                         f"{smallest} image(s): it needs at least 2 per class (or choose another codsa.policy)")
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
    pred = cross_val_predict(LogisticRegression(max_iter=500), features_nd, labels_n, cv=split)
    return [float((pred[labels_n == c] != c).mean()) for c in range(num_classes)]
