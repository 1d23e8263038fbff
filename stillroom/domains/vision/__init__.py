"""Image classifiers, the second domain (:mod:`stillroom.domains.base`): a small classifier distilled from
a classifier teacher on an image data set (scikit-learn's 8x8 digits today) through the one core.

* :mod:`.data`: data sets, the hash split, :class:`~.data.ImageBatch` (``inputs [B, C, H, W]``,
  ``target_ids`` / ``loss_mask [B, 1]``);
* :mod:`.models`: MLP and small-CNN classifiers from config, saved as safetensors + ``config.json``;
* :mod:`.forward`: the player's forward (``{"logits": [B, 1, C]}``) and the in-process teacher signal;
* :mod:`.teacher`: a teacher loaded from a folder, or trained here through the loop and cached;
* :mod:`.metrics`: accuracy, agreement, ECE, KL, CE, images/s, the confusion matrix;
* :mod:`.prepare`: :class:`~.prepare.ClassifierDomain` and its prepared run.
"""

from stillroom.domains.vision.prepare import ClassifierDomain, ClassifierRun

__all__ = ["ClassifierDomain", "ClassifierRun"]
