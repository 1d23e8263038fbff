"""A pretrained image teacher adapted to the data set's classes: the frozen EfficientNet-Lite0 + a head fitted here.

``classifier.teacher.pretrained`` (:class:`~stillroom.config.pretrained_teacher.PretrainedTeacherConfig`) asks for
the ImageNet-1k EfficientNet-Lite0 (:mod:`.pretrained`) with its 1000-class head replaced by a linear head over the
data set's ``C`` classes. The head is a linear probe: the backbone's pooled features ``[N, 1280]`` of the labelled
training images (the first ``labels_per_class`` of each class, or all) are computed once, and a multinomial
logistic regression (scikit-learn, L-BFGS, L2 with inverse strength ``C``) is fitted on them: seconds on a CPU,
deterministic, so the teacher does not depend on the run's seed. The backbone is never trained.

The fitted teacher is kept in ``<cache_dir>/pretrained_heads/<key>/`` (:func:`~stillroom.models.cached.build_once`:
whole or not at all): ``model.safetensors`` (the head: ``head.weight [C, 1280]``, ``head.bias [C]``),
``config.json`` (format :data:`FORMAT`, the backbone's name, input size, image shape, class names) and
``teacher.json`` (settings, how many labelled images, held-out accuracy, feature images/s). ``key`` hashes the
settings, the backbone's weights file and the data, not the seed. The backbone is referenced, not copied: it
loads from the converted folder in the cache (:func:`.pretrained.lite0_folder`). Such a folder given as
``classifier.teacher.path`` loads back through :func:`load_pretrained_classifier`.

:class:`PretrainedClassifier` keeps the classifier contract (images ``[B, C_in, H, W]`` in ``[0, 1]`` -> logits
``[B, C]``; ``in_shape``, ``num_classes``, ``describe``), so every classifier method, the soft-label store and
ensembles use it unchanged; :meth:`PretrainedClassifier.features` gives the pooled ``[B, 1280]`` features that
``method: feature_kd`` distils.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stillroom.config.domains import _TRAINING, ClassifierTeacherConfig, _changed
from stillroom.config.pretrained_teacher import PretrainedTeacherConfig
from stillroom.domains.vision.data import ImageExample, ImageSplits, check_teacher_fits
from stillroom.domains.vision.pretrained import BUILTIN, Lite0Teacher, load_lite0, weights_file
from stillroom.models.builtin import cache_root
from stillroom.models.cached import build_once, settings_key
from stillroom.train.distributed import Topology

Log = Callable[[str], None]
FORMAT = "stillroom-pretrained-head/1"
FEATURE_DIM = 1280
"""Width of EfficientNet-Lite0's pooled features (its head's input)."""
RECIPE_VERSION = 1
"""Bumped when how the head is fitted changes (part of the cache key)."""


class PretrainedClassifier(nn.Module):
    """``backbone`` (frozen, eval) -> pooled features ``[B, 1280]`` -> ``head`` -> logits ``[B, num_classes]``.

    ``in_shape`` is the data set's ``(C_in, H, W)``; a one-channel image is copied into R, G and B when
    ``grayscale == "repeat"`` (otherwise refused, naming the setting). The backbone resizes to its own size."""

    def __init__(self, backbone: Lite0Teacher, head: nn.Linear, in_shape: tuple[int, int, int], *,
                 grayscale: str = "refuse", classes: list[str] | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.in_shape, self.num_classes = tuple(in_shape), head.out_features
        self.grayscale, self.classes = grayscale, classes
        self.requires_grad_(False)

    def rgb(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: the images as they are, or a grey channel repeated (``grayscale: repeat``)."""
        c = images_bchw.shape[1]
        if c == 3:
            return images_bchw
        if c == 1 and self.grayscale == "repeat":
            return images_bchw.expand(-1, 3, -1, -1)
        raise ValueError(rgb_refusal(c))

    def features(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[B, 1280]`` (what the head reads; no gradient flows into the backbone)."""
        return self.backbone.features(self.rgb(images_bchw))

    def forward(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """``images [B, C_in, H, W]`` in ``[0, 1]`` -> logits ``[B, num_classes]``."""
        return self.head(self.features(images_bchw))

    def describe(self) -> str:
        """e.g. ``EfficientNet-Lite0 (ImageNet-1k, frozen, 96 px) + linear head 1280->6 (4,660,190 params)``."""
        n = sum(p.numel() for p in self.parameters())
        return (f"EfficientNet-Lite0 (ImageNet-1k, frozen, {self.backbone.size} px) + linear head "
                f"{self.head.in_features}->{self.num_classes} ({n:,} params)")


def rgb_refusal(channels: int) -> str:
    """The message for images the RGB backbone cannot take."""
    fix = ("set classifier.teacher.pretrained.grayscale: repeat to copy the grey channel into R, G and B"
           if channels == 1 else "use a data set of RGB (or one-channel) images")
    return (f"the pretrained teacher (EfficientNet-Lite0, ImageNet RGB) takes 3-channel images, but the data set's "
            f"images have {channels} channel(s): {fix}")


def _check_settings(tc: ClassifierTeacherConfig, where: str) -> None:
    """Refuse ``pretrained`` beside settings that would be ignored (``path``, training settings, kind clip)."""
    given = [k for k in _TRAINING if _changed(tc, k)]
    if tc.path is not None or given or tc.kind != "classifier":
        other = "path" if tc.path is not None else ("kind: clip" if tc.kind != "classifier" else ", ".join(given))
        raise ValueError(f"{where}.pretrained is set beside {other}: a pretrained teacher's head is fitted here "
                         f"from `pretrained` alone; remove {other} (or remove `pretrained`)")


def backbone_identity() -> str:
    """``efficientnet-lite0:<sha256 of the weights file, 16 digits>`` (part of the cache key)."""
    return "efficientnet-lite0:" + hashlib.sha256(weights_file().read_bytes()).hexdigest()[:16]


def head_key(p: PretrainedTeacherConfig, data: ImageSplits, heldout_fraction: float) -> str:
    """16 hex digits: the settings that change the head (not ``batch_size``), the backbone's weights and the data."""
    settings = p.model_dump(mode="json", exclude={"batch_size"})
    return settings_key({"version": RECIPE_VERSION, "settings": settings, "backbone": backbone_identity(),
                         "dataset": data.dataset.name, "data": data.dataset.fingerprint(),
                         "heldout_fraction": heldout_fraction})


def labelled(train: list[ImageExample], per_class: int | None) -> list[ImageExample]:
    """The first ``per_class`` training images of each class, in data order (all when ``None``)."""
    from stillroom.domains.vision.datasets import first_per_class

    labels = torch.tensor([e.label for e in train], dtype=torch.long)
    return [train[i] for i in first_per_class(labels, torch.arange(len(train)), per_class).tolist()]


@torch.no_grad()
def features_of(model: PretrainedClassifier, examples: list[ImageExample], batch_size: int,
                device: torch.device) -> torch.Tensor:
    """Pooled features ``[N, 1280]`` fp32 (CPU) of ``examples``' images, ``batch_size`` per forward."""
    out = []
    for i in range(0, len(examples), batch_size):
        images = torch.stack([e.image for e in examples[i: i + batch_size]]).to(device)
        out.append(model.features(images).float().cpu())
    return torch.cat(out)


def fit_linear_head(features_nd: torch.Tensor, labels_n: torch.Tensor, num_classes: int, *, C: float,
                    max_iter: int) -> nn.Linear:
    """A ``Linear(d, num_classes)`` from multinomial logistic regression on ``features_nd`` (scikit-learn, L-BFGS).
    Every class must have an image. Two classes: scikit-learn's one logit ``z`` becomes ``[-z/2, z/2]`` (the same
    softmax probabilities)."""
    from sklearn.linear_model import LogisticRegression

    present = sorted(set(labels_n.tolist()))
    if present != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(present))
        raise ValueError(f"the pretrained teacher's head needs labelled images of every class; classes {missing} "
                         "have none: raise classifier.teacher.pretrained.labels_per_class or use more training images")
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(features_nd.double().numpy(), labels_n.numpy())
    weight, bias = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if num_classes == 2:
        weight, bias = torch.cat([-weight / 2, weight / 2]), torch.cat([-bias / 2, bias / 2])
    head = nn.Linear(features_nd.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def write_head_folder(model: PretrainedClassifier, folder: Path) -> None:
    """``model.safetensors`` (the head) + ``config.json`` of ``model`` into the existing ``folder``."""
    state = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    config = {"format": FORMAT, "backbone": BUILTIN, "size": model.backbone.size, "grayscale": model.grayscale,
              "in_shape": list(model.in_shape), "num_classes": model.num_classes, "feature_dim": FEATURE_DIM,
              "classes": model.classes,
              "about": "a linear head over EfficientNet-Lite0's pooled features; the backbone loads from "
                       "<cache_dir>/pretrained/efficientnet-lite0 (stillroom.domains.vision.lite0_head)"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def is_pretrained_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a fitted pretrained teacher (its ``config.json`` has format :data:`FORMAT`)."""
    path = Path(folder).expanduser() / "config.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def load_pretrained_classifier(folder: str | Path, cache_dir: str | None = None) -> PretrainedClassifier:
    """The teacher :func:`write_head_folder` saved in ``folder`` (CPU, eval mode), its backbone from the cache."""
    folder = Path(folder).expanduser()
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}/config.json: format {config.get('format')!r} is not {FORMAT!r} (not a fitted "
                         "pretrained teacher)")
    state = load_file(str(folder / "model.safetensors"))
    head = nn.Linear(state["head.weight"].shape[1], state["head.weight"].shape[0])
    head.load_state_dict({k[5:]: v for k, v in state.items()})
    backbone = load_lite0(cache_root(cache_dir), size=config["size"])
    model = PretrainedClassifier(backbone, head, tuple(config["in_shape"]), grayscale=config["grayscale"],
                                 classes=config.get("classes"))
    return model.eval()


def pretrained_teacher(tc: ClassifierTeacherConfig, data: ImageSplits, *, heldout_fraction: float,
                       cache_dir: str | None, device: torch.device, topology: Topology, log: Log,
                       where: str = "classifier.teacher") -> tuple[PretrainedClassifier, str]:
    """``(teacher in eval mode on device, where it comes from)``: ``tc.pretrained`` fitted here once (cached), or
    ``tc.path`` a fitted folder; checked against the data set's image shape and classes before any training."""
    ds = data.dataset
    if tc.pretrained is None:
        folder = Path(tc.path).expanduser()
        model = load_pretrained_classifier(folder, cache_dir)
        check_teacher_fits(folder, model.in_shape, model.num_classes, ds)
        model.rgb(torch.zeros(1, *ds.in_shape))  # refuses grey images unless the folder says repeat
        return model.to(device).eval(), f"{model.describe()}, loaded from {folder}"
    _check_settings(tc, where)
    p = tc.pretrained
    if ds.in_shape[0] != 3 and not (ds.in_shape[0] == 1 and p.grayscale == "repeat"):
        raise ValueError(f"{where}.pretrained: {rgb_refusal(ds.in_shape[0])} (classifier.dataset={ds.name!r})")
    folder = cache_root(cache_dir) / "pretrained_heads" / head_key(p, data, heldout_fraction)
    if not build_once(folder, complete=lambda f: (f / "teacher.json").is_file(), topology=topology,
                      build=lambda tmp: _fit(p, data, folder, tmp, cache_dir, device, log)):
        log(f"teacher: cached pretrained head {folder}")
    model = load_pretrained_classifier(folder, cache_dir)
    check_teacher_fits(folder, model.in_shape, model.num_classes, ds)
    record = json.loads((folder / "teacher.json").read_text())
    return model.to(device).eval(), (
        f"{model.describe()}; head fitted here (logistic regression, C {p.C}) on {record['labelled_images']} labelled "
        f"training images ({p.labels_per_class or 'all'} per class), held-out accuracy "
        f"{100 * record['heldout_accuracy']:.1f}%, cached in {folder}")


def _fit(p: PretrainedTeacherConfig, data: ImageSplits, folder: Path, tmp: Path, cache_dir: str | None,
         device: torch.device, log: Log) -> None:
    """Fit the head on the labelled images' features into ``tmp`` (renamed to ``folder`` by ``build_once``)."""
    ds = data.dataset
    backbone = load_lite0(cache_root(cache_dir), size=p.size)
    model = PretrainedClassifier(backbone, nn.Linear(FEATURE_DIM, ds.num_classes), tuple(ds.in_shape),
                                 grayscale=p.grayscale, classes=list(ds.classes)).to(device).eval()
    train = labelled(data.train, p.labels_per_class)
    log(f"teacher: fitting a linear head on EfficientNet-Lite0 features ({p.size} px) of {len(train)} labelled "
        f"images into {folder}")
    t0 = time.perf_counter()
    feats = features_of(model, train, p.batch_size, device)
    per_s = len(train) / max(time.perf_counter() - t0, 1e-9)
    t1 = time.perf_counter()
    labels = torch.tensor([e.label for e in train])
    model.head = fit_linear_head(feats, labels, ds.num_classes, C=p.C, max_iter=p.max_iter).to(device)
    model.requires_grad_(False)
    fit_s = time.perf_counter() - t1
    held = features_of(model, data.heldout, p.batch_size, device)
    held_labels = torch.tensor([e.label for e in data.heldout])
    with torch.no_grad():
        accuracy = float((model.head(held.to(device)).argmax(-1).cpu() == held_labels).float().mean())
    write_head_folder(model, tmp)
    record = {"settings": p.model_dump(mode="json"), "backbone": backbone_identity(), "dataset": ds.name,
              "labelled_images": len(train), "heldout_images": len(data.heldout), "heldout_accuracy": accuracy,
              "train_accuracy": float((model.head(feats.to(device)).argmax(-1).cpu() == labels).float().mean()),
              "feature_images_per_s": round(per_s, 1), "fit_seconds": round(fit_s, 2)}
    (tmp / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"teacher: head fitted in {record['fit_seconds']} s (features at {record['feature_images_per_s']} images/s), "
        f"held-out accuracy {100 * accuracy:.1f}%")
