"""Cluster pseudo-labels (UNFUSED, spec section 7.2): a frozen encoder's features -> PCA -> L2 -> k-means.

Every training image is encoded once, without augmentation (``[N, D]`` features); PCA (scikit-learn,
``whiten``: every component scaled to unit variance, i.e. eigen_power -0.5) keeps ``pca_dim`` components;
rows are L2-normalised; k-means (scikit-learn, one k-means++ start, at most ``iters`` Lloyd iterations,
``random_state`` from the seed) puts them in ``k`` clusters. An image's pseudo-label is its cluster id.

The labels are cached in ``<cache_dir>/pseudo_labels/<key>/`` (``labels.safetensors`` ``[N]`` int64 and
``pseudo_labels.json`` with the uids, the settings and the diagnostics), written in a temporary folder and
renamed; ``key`` hashes the encoder's weights (its identity), the data (fingerprint and training uids), the
settings and the seed. The diagnostics compare the clusters with the true labels (never used in
training): purity (each cluster counted as its majority class) and normalised mutual information.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stillroom.domains.vision.data import ImageExample
from stillroom.domains.vision.metrics import logits_of
from stillroom.models.builtin import cache_root
from stillroom.models.cached import settings_key

VERSION = 1
"""Bumped when how pseudo-labels are made changes (part of the cache key)."""
LABELS, RECORD = "labels.safetensors", "pseudo_labels.json"


@dataclass(frozen=True)
class ClusterSettings:
    """How features become pseudo-labels (``unfused.pca_dim`` / ``whiten`` / ``clusters`` / ``kmeans_iters``)."""

    pca_dim: int = 32
    whiten: bool = True
    clusters: int = 32
    iters: int = 20
    seed: int = 0
    """``random_state`` of PCA and k-means (scikit-learn takes 0 .. 2**32 - 1)."""


@dataclass(frozen=True)
class PseudoLabels:
    """Cluster ids of the training images: ``by_uid`` maps an image uid to its pseudo-label in ``[0, k)``."""

    by_uid: dict[str, int]
    k: int
    diagnostics: dict
    folder: Path | None = None

    def relabel(self, uids: list[str]) -> torch.Tensor:
        """``[B, 1]`` int64 pseudo-labels of ``uids`` (an image without one is refused)."""
        try:
            return torch.tensor([[self.by_uid[u]] for u in uids], dtype=torch.long)
        except KeyError as missing:
            raise KeyError(f"image {missing} has no pseudo-label: the pseudo-labels cover the training images "
                           "the clusters were made from") from None


def cluster_features(features_nd: np.ndarray, s: ClusterSettings) -> np.ndarray:
    """``[N]`` int64 cluster ids of ``features_nd`` ``[N, D]`` (PCA with whitening, L2 norm, k-means)."""
    from sklearn.cluster import KMeans  # here, not at import: every CLI command would pay 1 s for it
    from sklearn.decomposition import PCA

    n, d = features_nd.shape
    if s.clusters > n:
        raise ValueError(f"unfused.clusters={s.clusters} is more than the {n} training images; lower it")
    components = min(s.pca_dim, d, n)
    reduced = PCA(n_components=components, whiten=s.whiten, random_state=s.seed).fit_transform(
        features_nd.astype(np.float64))
    reduced /= np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
    kmeans = KMeans(n_clusters=s.clusters, n_init=1, max_iter=s.iters, random_state=s.seed)
    return kmeans.fit_predict(reduced).astype(np.int64)


def cluster_diagnostics(clusters_n: np.ndarray, labels_n: np.ndarray) -> dict:
    """Purity (share of images whose cluster's majority class is their class), NMI (arithmetic), cluster sizes."""
    from sklearn.metrics import normalized_mutual_info_score

    majority = sum(np.bincount(labels_n[clusters_n == c]).max() for c in np.unique(clusters_n))
    sizes = np.bincount(clusters_n)
    return {"purity": float(majority / len(labels_n)),
            "nmi": float(normalized_mutual_info_score(labels_n, clusters_n)),
            "clusters_used": int((sizes > 0).sum()), "largest_cluster": int(sizes.max()),
            "smallest_cluster": int(sizes[sizes > 0].min())}


def encoder_identity(encoder: torch.nn.Module) -> str:
    """SHA-256 of the encoder's tensors (names, shapes, values): the teacher part of the cache key."""
    h = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def labels_key(encoder: torch.nn.Module, fingerprint: str, examples: list[ImageExample], s: ClusterSettings) -> str:
    payload = {"version": VERSION, "encoder": encoder_identity(encoder), "data": fingerprint,
               "uids": hashlib.sha256("\n".join(e.uid for e in examples).encode()).hexdigest(),
               "settings": s.__dict__}
    return settings_key(payload)


def encode_images(encoder: torch.nn.Module, examples: list[ImageExample], batch_size: int = 256) -> np.ndarray:
    """``[N, D]`` float32 features of the images (eval mode, no grad, no augmentation)."""
    images = torch.stack([e.image for e in examples])
    device = next(encoder.parameters()).device
    return logits_of(encoder.eval(), images, batch_size=batch_size, device=device).float().cpu().numpy()


def pseudo_labels(encoder: torch.nn.Module, examples: list[ImageExample], fingerprint: str, s: ClusterSettings, *,
                  cache_dir: str | None) -> PseudoLabels:
    """The cached pseudo-labels of ``examples`` (made and cached first when missing)."""
    folder = cache_root(cache_dir) / "pseudo_labels" / labels_key(encoder, fingerprint, examples, s)
    if not (folder / RECORD).is_file():
        clusters = cluster_features(encode_images(encoder, examples), s)
        truth = np.array([e.label for e in examples])
        record = {"uids": [e.uid for e in examples], "settings": s.__dict__,
                  "diagnostics": cluster_diagnostics(clusters, truth)}
        _write(folder, torch.from_numpy(clusters), record)
    record = json.loads((folder / RECORD).read_text())
    labels = load_file(str(folder / LABELS))["labels"].tolist()
    return PseudoLabels(dict(zip(record["uids"], labels)), s.clusters, record["diagnostics"], folder)


def _write(folder: Path, labels_n: torch.Tensor, record: dict) -> None:
    """``labels.safetensors`` + ``pseudo_labels.json`` into a temporary folder, renamed to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({"labels": labels_n.contiguous()}, str(tmp / LABELS))
    (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # made by another run in the meantime: the same labels
        shutil.rmtree(tmp, ignore_errors=True)
