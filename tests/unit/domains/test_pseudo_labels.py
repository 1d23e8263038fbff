"""Cluster pseudo-labels: purity and NMI by hand, well-separated blobs recovered exactly, seeded and cached
by the encoder's identity and the data, written atomically, and the SimCLR teacher cached like a classifier
teacher (trained once through the loop, then loaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stillroom.config.domains import ClassifierArch
from stillroom.config.unfused import SimclrConfig
from stillroom.domains.vision import pseudo_labels as pl
from stillroom.domains.vision.data import ImageExample, build_image_splits
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.pseudo_labels import ClusterSettings, cluster_diagnostics, cluster_features
from stillroom.methods.simclr import ssl_teacher
from stillroom.train.distributed import Topology


def test_purity_and_nmi_by_hand():
    d = cluster_diagnostics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    assert d["purity"] == pytest.approx(3 / 4) and d["clusters_used"] == 2 and d["largest_cluster"] == 2
    perfect = cluster_diagnostics(np.array([2, 2, 0, 0, 1]), np.array([0, 0, 1, 1, 2]))
    assert perfect["purity"] == 1.0 and perfect["nmi"] == pytest.approx(1.0)


def _blobs(n_per=20, k=4, d=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d))
    x = np.concatenate([c + rng.normal(0, 0.3, (n_per, d)) for c in centres])
    return x, np.repeat(np.arange(k), n_per)


def test_separated_blobs_are_recovered_and_seeded():
    x, y = _blobs()
    s = ClusterSettings(pca_dim=5, whiten=True, clusters=4, iters=50, seed=1)
    clusters = cluster_features(x, s)
    assert cluster_diagnostics(clusters, y)["purity"] == 1.0
    assert np.array_equal(clusters, cluster_features(x, s))  # the same seed: the same ids
    with pytest.raises(ValueError, match="unfused.clusters=100"):
        cluster_features(x, ClusterSettings(clusters=100))


def _examples(n=40):
    x, y = _blobs(n_per=n // 4, d=64)
    return [ImageExample(torch.tensor(v, dtype=torch.float32).reshape(1, 8, 8), int(c), f"b:{i}")
            for i, (v, c) in enumerate(zip(x, y))]


def test_cached_by_encoder_identity_and_data(tmp_path, monkeypatch):
    examples = _examples()
    encoder = build_classifier(ClassifierArch(kind="mlp", hidden=[]), (1, 8, 8), 16, seed=0)
    s = ClusterSettings(pca_dim=3, clusters=4, iters=30, seed=0)  # 4 blobs span 3 directions
    first = pl.pseudo_labels(encoder, examples, "fp", s, cache_dir=str(tmp_path))
    assert set(first.by_uid) == {e.uid for e in examples} and set(first.by_uid.values()) <= set(range(4))
    assert first.diagnostics["purity"] == 1.0 and first.folder.parent == tmp_path / "pseudo_labels"
    assert not list(first.folder.parent.glob(".tmp-*"))
    monkeypatch.setattr(pl, "cluster_features", lambda *_a: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = pl.pseudo_labels(encoder, examples, "fp", s, cache_dir=str(tmp_path))
    assert again.by_uid == first.by_uid and again.folder == first.folder
    other = build_classifier(ClassifierArch(kind="mlp", hidden=[]), (1, 8, 8), 16, seed=1)
    for args in ((other, examples, "fp"), (encoder, examples, "other data"), (encoder, examples[:-4], "fp")):
        with pytest.raises(AssertionError, match="recomputed"):
            pl.pseudo_labels(*args, s, cache_dir=str(tmp_path))


def test_ssl_teacher_trains_once_then_loads_from_the_cache(tmp_path):
    data = build_image_splits("digits", 0.2)
    s = SimclrConfig(arch=ClassifierArch(kind="mlp", hidden=[32]), embedding_dim=16, steps=3, batch_size=32)
    logs: list[str] = []
    torch.manual_seed(5)
    enc, origin, folder = ssl_teacher(s, data, seed=0, cache_dir=str(tmp_path), device=torch.device("cpu"),
                                      topology=Topology(), log=logs.append)
    after_training = torch.random.get_rng_state()
    assert enc(torch.rand(2, 1, 8, 8)).shape == (2, 16) and "trained here without labels for 3 steps" in origin
    assert (folder / "model.safetensors").is_file() and not (folder / "checkpoints").exists()
    logs.clear()
    torch.manual_seed(5)
    enc2, _, folder2 = ssl_teacher(s, data, seed=0, cache_dir=str(tmp_path), device=torch.device("cpu"),
                                   topology=Topology(), log=logs.append)
    assert torch.equal(after_training, torch.random.get_rng_state())  # the run goes on as with a cached one
    assert folder2 == folder and any("cached SimCLR teacher" in m for m in logs)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()))
