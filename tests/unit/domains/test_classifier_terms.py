"""Every logit loss term trains a classifier through the domain's job and the one loop; hidden-state terms
are refused before step 0."""

import math

import pytest
import torch

from stillroom.config.load import load_config
from stillroom.domains.vision.data import build_image_splits
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.prepare import ClassifierRun
from stillroom.losses import REGISTRY
from stillroom.methods import METHODS
from stillroom.train.distributed import Topology
from stillroom.train.loop import train

LOGIT_TERMS = sorted(name for name, spec in REGISTRY.items() if spec.kind == "logit" and not spec.vocab_free)
"""Every logit term a classifier can train with (``uld`` compares a teacher with another vocabulary: LM cross mode)."""


@pytest.fixture(scope="module")
def parts():
    data = build_image_splits("digits", 0.2)
    teacher = build_classifier(load_config(None, ["domain=classifier"]).classifier.teacher.arch, (1, 8, 8), 10,
                               seed=0).eval()
    return data, teacher


def _run(tmp_path, parts, *overrides) -> ClassifierRun:
    data, teacher = parts
    cfg = load_config(None, ["domain=classifier", f"output_dir={tmp_path}", "train.steps=3", "train.warmup_steps=1",
                             "train.micro_batch_size=16", "train.precision=fp32", "train.eval_every=2", *overrides])
    student = build_classifier(cfg.classifier.student, (1, 8, 8), 10, seed=1)
    return ClassifierRun(cfg, Topology(), torch.device("cpu"), teacher, student, data, "test teacher")


@pytest.mark.parametrize("term", LOGIT_TERMS)
def test_every_logit_term_trains(tmp_path, parts, term):
    prep = _run(tmp_path, parts, f"loss.terms=[{{name: {term}}}]")
    job, _ = prep.job(prep.student, METHODS["kd"], baseline=False, run_dir=tmp_path / "run", resume=False,
                      log=lambda s: None)
    result = train(job)
    assert result.steps == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.targets == 3 * 16  # one target per image


def test_sft_is_ce_alone_without_teacher(tmp_path, parts):
    prep = _run(tmp_path, parts, "loss.terms=[{name: forward_kl}]")
    job, _ = prep.job(prep.student, METHODS["sft"], baseline=True, run_dir=tmp_path / "b", resume=False,
                      log=lambda s: None)
    objective = job.players[0].objective
    assert objective.teacher is None and objective.mix.keys == ["ce"]


@pytest.mark.parametrize("term", ["hidden_mse", "attention_mse"])
def test_hidden_and_attention_terms_are_refused(tmp_path, parts, term):
    prep = _run(tmp_path, parts, f"loss.terms=[{{name: forward_kl}}, {{name: {term}, params: {{layers: [[0, 0]]}}}}]")
    with pytest.raises(ValueError, match="logits only"):
        prep.job(prep.student, METHODS["kd"], baseline=False, run_dir=tmp_path / "run", resume=False,
                 log=lambda s: None)
