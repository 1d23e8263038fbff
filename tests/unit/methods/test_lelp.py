"""LELP: the construction's invariants by hand (null space, exact class marginals, orthogonal rotation, PCA
directions), the grouped outputs (logsumexp classes, aggregated CE, save/reload), few-class grouping, the
config checks, the cached construction against a fresh one, and the objective's loss against a plain one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stillroom.config.domains import ClassifierArch, ClassifierConfig
from stillroom.config.schema import RunConfig
from stillroom.domains.vision.class_groups import resolve_groups
from stillroom.domains.vision.data import build_image_splits, collate_images
from stillroom.domains.vision.forward import ClassifierForward
from stillroom.domains.vision.models import build_classifier, save_classifier
from stillroom.domains.vision.subclasses import (
    GroupedOutputs, build_basis, class_logits, embeddings_and_logits, head_of, load_grouped, null_space_projector,
    principal_directions, random_rotation,
)
from stillroom.losses import LossMix
from stillroom.methods import METHODS
from stillroom.methods.base import MethodContext
from stillroom.methods.lelp import LelpObjective, aggregated_ce, subclass_signal, teacher_basis
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective

MLP = {"kind": "mlp", "hidden": [16, 8]}


def _teacher(classes: int = 2):
    return build_classifier(ClassifierArch(**MLP), (1, 8, 8), classes, seed=3).eval()


def _cfg(tmp_path, **lelp) -> RunConfig:
    return RunConfig.model_validate({
        "domain": "classifier", "method": "lelp", "cache_dir": str(tmp_path / "cache"), "seed": 5,
        "classifier": {"class_groups": "parity", "teacher": {"arch": MLP}, "student": {"kind": "mlp", "hidden": [8]}},
        "lelp": {"subclasses": 3, **lelp}, "loss": {"terms": [{"name": "forward_kl"}]}})


def _context(cfg: RunConfig, teacher, model=None, logs=None) -> MethodContext:
    data = build_image_splits("digits", 0.2, cfg.classifier)
    return MethodContext(cfg=cfg, run_dir=cfg.run_dir, model=model, data=data, tokenizer=None, teacher_model=teacher,
                         vocab_size=6, topology=Topology(), mix=None, log=(logs.append if logs is not None else print))


def test_null_space_projection_leaves_the_teachers_logits_unchanged():
    teacher = _teacher()
    head = head_of(teacher)
    p = null_space_projector(head.weight.detach())
    assert torch.allclose(head.weight.double() @ p, torch.zeros(2, 8, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-12)  # an orthogonal projector
    emb, _ = embeddings_and_logits(teacher, torch.rand(6, 1, 8, 8))
    moved = emb + (torch.randn(6, 8) @ p.float())  # any null-space component added to e
    assert torch.allclose(head(moved), head(emb), atol=1e-5)


def test_rotation_is_orthogonal_and_rotated_directions_stay_orthonormal():
    r = random_rotation(5, torch.Generator().manual_seed(0))
    assert torch.allclose(r @ r.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    basis = build_basis(torch.randn(60, 8), torch.arange(60) % 2, torch.randn(2, 8), 3, seed=1)
    for u in basis.directions_cds:
        assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    other = build_basis(torch.randn(60, 8), torch.arange(60) % 2, torch.randn(2, 8), 3, seed=2)
    assert not torch.allclose(random_rotation(3, torch.Generator().manual_seed(1)),
                              random_rotation(3, torch.Generator().manual_seed(2)))
    assert other.directions_cds.shape == (2, 8, 3)


def test_pca_by_hand_in_the_null_space():
    # W reads coordinate 0 only, so the null space is coordinates 1 and 2; class 0 varies along 1 (wide) and 2.
    w = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    emb = torch.tensor([[5.0, 2.0, 0.1], [7.0, -2.0, 0.1], [6.0, 0.0, -0.2],
                        [-5.0, 0.0, 1.0], [-6.0, 0.0, -1.0], [-7.0, 0.5, 0.0]])
    mean, dirs, var = principal_directions(emb[:3].double() @ null_space_projector(w), 1)
    assert mean.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    assert abs(float(dirs[1, 0])) == pytest.approx(1.0, abs=1e-12) and float(dirs[0, 0]) == pytest.approx(0.0)
    assert float(var[0]) == pytest.approx((4 + 4 + 0) / 2, rel=1e-12)  # unbiased variance along it


def test_subclass_distribution_sums_to_the_teachers_class_distribution_exactly():
    teacher = _teacher(3)
    images = torch.rand(40, 1, 8, 8)
    emb, logits = embeddings_and_logits(teacher, images)
    basis = build_basis(emb, logits.argmax(-1).clamp(max=2) * 0 + torch.arange(40) % 3, head_of(teacher).weight, 4, 0)
    for standardize in (True, False):
        logp = basis.log_probs(emb.double(), logits.double(), beta=0.5, standardize=standardize)
        assert logp.shape == (40, 12)
        summed = logp.exp().unflatten(-1, (3, 4)).sum(-1)
        assert torch.allclose(summed, logits.double().softmax(-1), atol=1e-12)
        assert torch.allclose(class_logits(logp, 4).softmax(-1), logits.double().softmax(-1), atol=1e-12)


def test_signal_through_the_hook_equals_the_plain_embedding_path():
    teacher = _teacher()
    images = torch.rand(7, 1, 8, 8)
    emb, logits = embeddings_and_logits(teacher, torch.rand(30, 1, 8, 8))
    basis = build_basis(emb, torch.arange(30) % 2, head_of(teacher).weight, 3, 0).to("cpu")
    cfg = _cfg_plain()
    plain_emb = teacher.layers[:-1](images)  # the head's input computed without hooks
    plain = basis.log_probs(plain_emb, teacher.layers[-1](plain_emb), beta=0.7, standardize=True)
    assert torch.allclose(subclass_signal(teacher, basis, images, cfg), plain, atol=1e-6)


def _cfg_plain():
    from stillroom.config.methods import LelpConfig
    return LelpConfig(subclasses=3, beta=0.7)


def test_class_logits_and_aggregated_ce_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # C = 2 classes x S = 2
    agg = class_logits(logits, 2)
    assert agg.tolist()[0] == pytest.approx([torch.tensor([0.0, 1.0]).logsumexp(0).item(),
                                             torch.tensor([2.0, 3.0]).logsumexp(0).item()])
    total, count = aggregated_ce(logits.repeat(2, 1), torch.tensor([0, 1]), 2)
    p = logits.softmax(-1)[0]
    expected = -torch.log(p[0] + p[1]) - torch.log(p[2] + p[3])
    assert count == 2 and float(total) == pytest.approx(float(expected), rel=1e-6)


def test_grouped_student_saves_and_reloads_as_a_class_model(tmp_path):
    raw = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 8, seed=0)
    save_classifier(raw, tmp_path / "s", extra={"classes": ["even", "odd"], "outputs_per_class": 4})
    loaded = load_grouped(tmp_path / "s")
    images = torch.rand(3, 1, 8, 8)
    assert isinstance(loaded, GroupedOutputs) and loaded.num_classes == 2
    assert torch.allclose(loaded(images), class_logits(raw(images), 4), atol=1e-6)
    save_classifier(raw, tmp_path / "plain")
    assert not isinstance(load_grouped(tmp_path / "plain"), GroupedOutputs)


def test_class_groups_resolve_check_and_keep_fine_labels():
    assert resolve_groups("parity", 10) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert resolve_groups("halves", 5) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match=r"missing \[9\]"):
        resolve_groups([[0, 1, 2, 3, 4], [5, 6, 7, 8]], 10)
    splits = build_image_splits("digits", 0.2, ClassifierConfig(class_groups=[[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]],
                                                                 class_group_names=["small", "big"]))
    assert splits.dataset.classes == ["small", "big"] and splits.dataset.num_classes == 2
    assert all(e.label == int(e.fine_label > 2) for e in splits.train + splits.heldout)
    assert {e.fine_label for e in splits.train} == set(range(10))
    assert any("classes grouped into 2: small = 0, 1, 2" in line for line in splits.notes())
    plain = build_image_splits("digits", 0.2)
    assert all(e.fine_label == e.label for e in plain.train[:50]) and plain.dataset.num_classes == 10


@pytest.mark.parametrize("bad, match", [
    ({"class_groups": [[0, 1], [1, 2]]}, "one group only"),
    ({"class_groups": [[0, 1, 2]]}, "at least 2"),
    ({"class_groups": "parity", "class_group_names": ["a", "b", "c"]}, "3 names for 2 groups"),
    ({"class_group_names": ["a", "b"]}, "without classifier.class_groups"),
])
def test_class_group_settings_are_refused_when_wrong(bad, match):
    with pytest.raises(ValueError, match=match):
        ClassifierConfig(**bad)


@pytest.mark.parametrize("change, match", [
    ({"loss": {"terms": [{"name": "forward_kl"}, {"name": "ce"}]}}, "lelp.alpha"),
    ({"classifier": {"teacher_source": "store"}}, "teacher_source: online"),
    ({"domain": "lm", "classifier": None}, "domain: classifier"),
])
def test_lelp_config_checks(tmp_path, change, match):
    raw = _cfg(tmp_path).model_dump(exclude_unset=True)
    raw.update(change)
    with pytest.raises(ValueError, match=match):
        RunConfig.model_validate({k: v for k, v in raw.items() if v is not None})


def test_method_declares_its_grouped_outputs(tmp_path):
    assert METHODS["lelp"].outputs_per_class(_cfg(tmp_path)) == 3
    assert METHODS["kd"].outputs_per_class is None


def test_cached_construction_equals_a_fresh_one_and_its_key_follows_the_settings(tmp_path):
    cfg, teacher, logs = _cfg(tmp_path), _teacher(), []
    fresh = teacher_basis(_context(cfg, teacher, logs=logs))
    cached = teacher_basis(_context(cfg, teacher, logs=logs))
    assert "built 3 subclasses" in logs[0] and "cached construction" in logs[1]
    for name, tensor in fresh.tensors().items():
        assert torch.equal(tensor, cached.tensors()[name]), name
    teacher_basis(_context(_cfg(tmp_path, rotation_seed=9), teacher, logs=logs))
    teacher_basis(_context(_cfg(tmp_path, beta=3.0), teacher, logs=logs))  # beta applies later: same basis
    assert "cached construction" in logs[-1]
    teacher_basis(_context(_cfg(tmp_path, subclasses=2), teacher, logs=logs))
    assert len(list((tmp_path / "cache" / "lelp").glob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache" / "lelp").glob(".tmp-*"))


def test_objective_is_kl_to_the_subclass_distribution_plus_alpha_aggregated_ce(tmp_path):
    cfg, teacher = _cfg(tmp_path, alpha=0.5, beta=2.0), _teacher()
    ctx = _context(cfg, teacher)
    basis = teacher_basis(ctx)
    student = build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 6, seed=0)
    mix = LossMix(cfg.loss)
    objective = LelpObjective(DistillObjective(ClassifierForward(student), mix, object()), teacher, basis, cfg.lelp)
    batch = collate_images(ctx.data.train[:9])
    signal = objective.signal(batch)
    result = objective.loss(objective.forward(batch), batch, signal)
    target = subclass_signal(teacher, basis.to("cpu"), batch.inputs, cfg.lelp)
    s_logp = student(batch.inputs).log_softmax(-1)
    kl = (target.exp() * (target - s_logp)).sum()
    ce = F.cross_entropy(class_logits(student(batch.inputs), 3), batch.labels, reduction="sum")
    expected = float((kl + 0.5 * ce).detach())
    assert result.count == 9 and float(result.total.detach()) == pytest.approx(expected, rel=1e-5)
    result.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert json.dumps(result.parts)  # loggable
