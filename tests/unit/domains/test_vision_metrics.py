"""Classifier metrics against hand computations."""

import math

import pytest
import torch

from stillroom.domains.vision.metrics import (
    classifier_metrics, confusion_matrix, expected_calibration_error, images_per_s, kl_teacher_model,
)


def _logits_for(probs):
    return torch.tensor(probs).log()


def test_ece_by_hand():
    # top-1 confidences 0.9, 0.6, 0.55, 0.8; correct: yes, no, yes, yes. 15 bins of width 1/15:
    # 0.9 -> bin 13, 0.8 -> bin 12, 0.6 -> bin 9, 0.55 -> bin 8: every example alone in its bin, so
    # ECE = mean |correct - confidence| = (0.1 + 0.6 + 0.45 + 0.2) / 4.
    probs = [[0.9, 0.1], [0.4, 0.6], [0.55, 0.45], [0.2, 0.8]]
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(_logits_for(probs), labels) == pytest.approx((0.1 + 0.6 + 0.45 + 0.2) / 4, abs=1e-6)
    # two examples in one bin: |mean accuracy - mean confidence| weighted by the bin's share
    probs = [[0.7, 0.3], [0.7, 0.3]]
    assert expected_calibration_error(_logits_for(probs), torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.7), abs=1e-6)


def test_accuracy_agreement_ce_kl():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    m = classifier_metrics(logits, labels, teacher)
    assert m["accuracy"] == pytest.approx(0.75) and m["top1_agreement"] == pytest.approx(0.5) and m["examples"] == 4
    p_right = math.exp(2) / (math.exp(2) + 2)
    assert m["heldout_ce"] == pytest.approx((-3 * math.log(p_right) - math.log(1 / (math.exp(2) + 2))) / 4, rel=1e-5)
    assert m["kl_teacher_student"] == pytest.approx(float(kl_teacher_model(teacher, logits).mean()))
    same = classifier_metrics(teacher, labels, teacher)
    assert same["top1_agreement"] == 1.0 and same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-7)
    assert "top1_agreement" not in classifier_metrics(logits, labels)
    # KL by hand on one row, and a class the teacher rules out (probability 0) contributes 0
    t, s = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    pt = torch.tensor([0.25, 0.75])
    assert float(kl_teacher_model(t, s)[0]) == pytest.approx(float((pt * (pt / 0.5).log()).sum()), rel=1e-6)
    assert float(kl_teacher_model(torch.tensor([[0.0, -math.inf]]), s)[0]) == pytest.approx(math.log(2), rel=1e-6)


def test_confusion_matrix_rows_are_true_classes():
    m = confusion_matrix(torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 2, 1]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_images_per_s_is_positive_and_keeps_the_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model.train()
    rate = images_per_s(model, torch.rand(32, 1, 8, 8), device=torch.device("cpu"), repeats=2, min_seconds=0.001)
    assert rate > 0 and model.training
