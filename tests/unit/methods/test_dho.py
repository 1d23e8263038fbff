"""DHO: the semi-supervised split (sizes, disjoint parts, labels removed), the loss against the spec's formula and
the library's KD term, the two-stream sampler, the mixture and its search, the dual-head student saved and
reloaded (plain torch, and a transformers folder loaded without stillroom), and the config checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stillroom.config.core import LossConfig, LossTerm
from stillroom.config.dho import DhoConfig, SemiSupervisedConfig
from stillroom.config.domains import ClassifierArch
from stillroom.config.schema import RunConfig
from stillroom.domains.vision.data import build_image_splits, collate_images
from stillroom.domains.vision.dual_head import (
    DualHeadClassifier, dual_head_settings, load_dual_head, mixture_log_probs, save_dual_head,
)
from stillroom.domains.vision.forward import ClassifierTeacher
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.semi_supervised import UNLABELLED, split_semi_supervised
from stillroom.losses import LossMix, StudentOutput
from stillroom.methods.dho import (
    DhoForward, DhoObjective, MemoTeacher, TwoStreamSampler, group_weights, kd_kl_per_image, labelled_ce_sum, stream_sizes,
)
from stillroom.methods.dho_mixture import best_pair, choose_mixture, grid_scores

MLP = {"kind": "mlp", "hidden": [16]}
KD_LOSS = LossConfig(terms=[LossTerm(name="forward_kl")], loss_temperature=2.0, scale_by_temperature_squared=True)


@pytest.fixture(scope="module")
def digits():
    return build_image_splits("digits", 0.2)


def _split(digits, **settings):
    return split_semi_supervised(digits, SemiSupervisedConfig(**settings), run_seed=0)


def _dual(seed: int = 1) -> DualHeadClassifier:
    return DualHeadClassifier(build_classifier(ClassifierArch(**MLP), (1, 8, 8), 20, seed=seed))


def test_split_sizes_disjoint_parts_and_removed_labels(digits):
    data = _split(digits, labels_per_class=5, val_per_class=10, unlabelled_per_class=40)
    assert data.labelled_count == 50 and len(data.labelled) == 50 and len(data.validation) == 100
    assert len(data.unlabelled) == 400 and len(data.unused) == len(digits.train) - 550
    uids = [[e.uid for e in part] for part in (data.labelled, data.unlabelled, data.validation, data.unused)]
    assert len(set().union(*map(set, uids))) == sum(map(len, uids)) == len(digits.train)  # disjoint, complete
    assert all(e.label == UNLABELLED and e.fine_label is None for e in data.unlabelled)
    for part in (data.labelled, data.validation):
        assert sorted(torch.bincount(torch.tensor([e.label for e in part])).tolist()) == [len(part) // 10] * 10
    assert data.baseline_train == data.labelled and data.heldout is digits.heldout
    assert [e.uid for e in _split(digits, labels_per_class=5).labelled] == \
        [e.uid for e in _split(digits, labels_per_class=5).labelled]
    other = split_semi_supervised(digits, SemiSupervisedConfig(labels_per_class=5), run_seed=1)
    assert {e.uid for e in other.labelled} != {e.uid for e in _split(digits, labels_per_class=5).labelled}
    assert "50 labelled / " in data.notes()[-1]


def test_split_refuses_a_class_with_too_few_images(digits):
    with pytest.raises(ValueError, match="val_per_class \\+ labels_per_class"):
        _split(digits, labels_per_class=100, val_per_class=100)


def _batch(data, n_l: int, n_u: int):
    return collate_images(data.labelled[:n_l] + data.unlabelled[:n_u])


def _objective(model, lam: float = 0.5, every: int = 0) -> DhoObjective:
    teacher = build_classifier(ClassifierArch(**MLP), (1, 8, 8), 10, seed=7).eval()
    return DhoObjective(DhoForward(model), LossMix(KD_LOSS), ClassifierTeacher(teacher),
                        DhoConfig(ce_weight=lam, gradient_cosine_every=every))


def test_kd_reference_equals_the_library_term():
    z_s, z_t = torch.randn(6, 10), torch.randn(6, 10) * 3
    mix = LossMix(KD_LOSS)
    result = mix(StudentOutput(logits_btv=z_s[:, None]), z_t[:, None], None, torch.ones(6, 1, dtype=torch.bool))
    assert float(result.total) == pytest.approx(float(kd_kl_per_image(z_s, z_t, 2.0).sum()), rel=1e-5)


def test_loss_is_lambda_labelled_ce_plus_both_kd_means(digits):
    data, model = _split(digits), _dual()
    batch = _batch(data, 3, 5)
    objective = _objective(model, lam=0.3)
    outputs, signal = objective.forward(batch), objective.signal(batch)
    result = objective.loss(outputs, batch, signal)
    z_ce, z_kd = model.heads(batch.inputs)
    z_t = signal.logits_btv[:, 0]
    labelled = batch.labels != UNLABELLED
    kd = kd_kl_per_image(z_kd, z_t, 2.0)
    expected = 0.3 * F.cross_entropy(z_ce[labelled], batch.labels[labelled]) + \
        0.7 * (kd[labelled].mean() + kd[~labelled].mean())
    assert result.count == 8
    assert float(result.total.detach()) / 8 == pytest.approx(float(expected.detach()), rel=1e-5)
    assert group_weights(labelled).tolist() == pytest.approx([8 / 3] * 3 + [8 / 5] * 5)


def test_unlabelled_images_teach_the_ce_head_nothing(digits):
    data, model = _split(digits), _dual()
    batch = _batch(data, 2, 4)
    assert batch.labels[2:].tolist() == [UNLABELLED] * 4  # the split removed them before any batch existed
    objective = _objective(model, lam=1.0)  # CE only: the unlabelled rows must not move anything
    outputs = objective.forward(batch)
    outputs["ce"].retain_grad()
    objective.loss(outputs, batch, objective.signal(batch)).total.backward()
    assert outputs["ce"].grad[2:].abs().max() == 0 and outputs["ce"].grad[:2].abs().max() > 0
    assert float(labelled_ce_sum(torch.randn(3, 10), torch.full((3,), UNLABELLED))) == 0.0


def test_teacher_cache_gives_the_online_teacher_numbers_running_each_image_once(digits):
    data = _split(digits)
    teacher = build_classifier(ClassifierArch(**MLP), (1, 8, 8), 10, seed=7).eval()
    calls = []
    teacher.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    online, memo = ClassifierTeacher(teacher), MemoTeacher(ClassifierTeacher(teacher))
    sampler = TwoStreamSampler(data.labelled_count, len(data.unlabelled), 16, 0.5, seed=0)
    batches = [collate_images([data.train[i] for i in sampler.next_indices()]) for _ in range(12)]
    plain = [online.signal(b).logits_btv for b in batches]
    calls.clear()
    cached = [memo.signal(b).logits_btv for b in batches]
    for p, c in zip(plain, cached):
        assert p.shape == c.shape and torch.allclose(p, c, atol=1e-5)
    assert sum(calls) == len({uid for b in batches for uid in b.uids}) < 12 * 16  # each image once


def test_gradient_cosine_is_measured_between_the_terms(digits):
    data, model = _split(digits), _dual()
    batch = _batch(data, 3, 3)
    objective = _objective(model, every=1)
    objective.loss(objective.forward(batch), batch, objective.signal(batch)).total.backward()
    assert len(objective.cosines) == 1 and -1.0 <= objective.cosines[0] <= 1.0
    assert objective.metrics()["dho/grad_cos"] == objective.cosines[0]


def test_two_stream_sampler_draws_both_streams_and_resumes():
    assert stream_sizes(8, 0.5, 100) == (4, 4) and stream_sizes(8, 0.01, 100) == (1, 7)
    assert stream_sizes(8, 0.5, 0) == (8, 0)
    sampler = TwoStreamSampler(10, 30, 8, 0.25, seed=3)
    for _ in range(12):
        idx = sampler.next_indices()
        assert len(idx) == 8 and all(i < 10 for i in idx[:2]) and all(10 <= i < 40 for i in idx[2:])
    state = json.loads(json.dumps(sampler.state_dict()))
    again = TwoStreamSampler(10, 30, 8, 0.25, seed=3)
    again.load_state_dict(state)
    assert [again.next_indices() for _ in range(5)] == [sampler.next_indices() for _ in range(5)]


def test_mixture_log_probs_are_the_formula():
    z_ce, z_kd = torch.randn(4, 5), torch.randn(4, 5)
    for alpha, beta in ((0.0, 0.5), (1.0, 2.0), (0.3, 1.5)):
        expected = alpha * z_ce.softmax(-1) + (1 - alpha) * (z_kd / beta).softmax(-1)
        assert torch.allclose(mixture_log_probs(z_ce, z_kd, alpha, beta).exp(), expected, atol=1e-6)


def test_search_picks_the_best_pair_and_breaks_ties_by_nll():
    labels = torch.tensor([0, 1, 2, 0])
    # each head is wrong where it is the less confident one, so only the even mixture gets every image right
    z_ce = F.one_hot(torch.tensor([0, 1, 1, 0]), 3).float() * torch.tensor([[4.0], [6.0], [2.0], [6.0]])
    z_kd = F.one_hot(torch.tensor([0, 2, 2, 2]), 3).float() * torch.tensor([[4.0], [2.0], [6.0], [2.0]])
    rows = grid_scores(z_ce, z_kd, labels, [0.0, 0.5, 1.0], [1.0])
    assert [r["accuracy"] for r in rows] == [0.5, 1.0, 0.75]
    assert best_pair(rows)["alpha"] == 0.5
    tied = [{"accuracy": 0.9, "nll": 0.5}, {"accuracy": 0.9, "nll": 0.4}, {"accuracy": 0.8, "nll": 0.1}]
    assert best_pair(tied) is tied[1]


def test_choose_mixture_sets_the_model(digits):
    data, model = _split(digits), _dual()
    found = choose_mixture(model, data.validation, DhoConfig(alpha_grid=[0.0, 1.0], beta_grid=[1.0, 2.0]), 64)
    assert model.mixture() == (found["alpha"], found["beta"]) and len(found["grid"]) == 4
    assert found["accuracy"] == max(r["accuracy"] for r in found["grid"])


@pytest.mark.parametrize("arch", [MLP, {"kind": "vit", "patch_size": 4, "hidden_size": 8, "layers": 1, "heads": 2}])
def test_dual_head_student_saves_and_reloads_exactly(tmp_path, arch):
    backbone = build_classifier(ClassifierArch(**arch), (1, 8, 8), 20, seed=2)
    model = DualHeadClassifier(backbone, alpha=0.35, beta=0.75).eval()
    classes = [str(c) for c in range(10)]
    save_dual_head(model, tmp_path / "student", classes)
    loaded = load_dual_head(tmp_path / "student")
    images = torch.rand(5, 1, 8, 8)
    assert loaded.mixture() == pytest.approx((0.35, 0.75))
    assert torch.allclose(loaded(images), model(images), atol=1e-6)
    entry = dual_head_settings(tmp_path / "student")
    assert entry["classes"] == classes and entry["ce_outputs"] == [0, 10] and entry["kd_outputs"] == [10, 20]
    if arch["kind"] == "vit":  # an ordinary Hugging Face folder: the mixture by hand from its 2C logits
        from transformers import AutoModelForImageClassification

        hf = AutoModelForImageClassification.from_pretrained(str(tmp_path / "student")).eval()
        logits = hf(pixel_values=(images - 0.5) / 0.5).logits
        by_hand = entry["alpha"] * logits[:, :10].softmax(-1) + (1 - entry["alpha"]) * (logits[:, 10:] / entry["beta"]).softmax(-1)
        assert torch.allclose(by_hand, model(images).exp(), atol=1e-5)
        assert hf.config.id2label[0] == "ce:0" and hf.config.id2label[10] == "kd:0"


def _run(**dho) -> dict:
    return {"domain": "classifier", "method": "dho", "loss": {"terms": [{"name": "forward_kl"}]},
            "classifier": {"teacher": {"arch": MLP}}, "dho": dho}


def test_config_checks_name_the_setting():
    RunConfig.model_validate(_run())
    with pytest.raises(ValueError, match="val_per_class is 0"):
        RunConfig.model_validate(_run(semi_supervised={"val_per_class": 0}))
    RunConfig.model_validate(_run(semi_supervised={"val_per_class": 0}, mixture="fixed"))
    with pytest.raises(ValueError, match="nothing to mix"):
        RunConfig.model_validate(_run(heads="single"))
    with pytest.raises(ValueError, match="CE head's"):
        RunConfig.model_validate({**_run(), "loss": {"terms": [{"name": "ce"}, {"name": "forward_kl"}]}})
    with pytest.raises(ValueError, match="teacher_source: online"):
        RunConfig.model_validate({**_run(), "classifier": {"teacher_source": "store"}})
    with pytest.raises(ValueError, match="alpha_grid"):
        RunConfig.model_validate(_run(alpha_grid=[1.5]))


def test_dho_runs_with_a_transformers_clip_folder_as_its_zero_shot_teacher(tmp_path):
    """The real-architecture check: a tiny random transformers CLIPModel folder (classifier.teacher.kind: clip) is
    DHO's teacher in a whole in-process run; the saved student predicts with the searched mixture."""
    from clip_helpers import tiny_clip_model_folder

    from stillroom.run import run

    clip = tiny_clip_model_folder(tmp_path / "clip")
    cfg = RunConfig.model_validate({
        "name": "dho_clip", "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "domain": "classifier", "method": "dho", "baseline": False, "eval": {"before": False},
        "classifier": {"dataset": "shapes", "shapes": {"classes": 3, "train_per_class": 20, "heldout_per_class": 4},
                       "teacher": {"kind": "clip", "path": str(clip)}, "student": {"kind": "cnn", "channels": [4]}},
        "dho": {"semi_supervised": {"labels_per_class": 2, "val_per_class": 2}, "alpha_grid": [0.0, 1.0],
                "beta_grid": [1.0]},
        "loss": {"terms": [{"name": "forward_kl"}], "loss_temperature": 2.0, "scale_by_temperature_squared": True},
        "train": {"steps": 3, "micro_batch_size": 4, "warmup_steps": 0, "precision": "fp32", "keep_checkpoints": 1},
    })
    run_dir = run(cfg, log=lambda _m: None)
    dho = json.loads((run_dir / "dho.json").read_text())
    assert dho["labelled_images"] == 6 and dho["unlabelled_images"] == 48 and dho["search"]["alpha"] in (0.0, 1.0)
    student = load_dual_head(run_dir / "student")
    assert student.mixture() == (dho["search"]["alpha"], 1.0) and student.num_classes == 3
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student_after"]["accuracy"] == pytest.approx(dho["heldout"]["mixture"]["accuracy"], abs=1e-6)
