"""UNFUSED: the multi-exit terms by hand (and their limits), detach_target's gradients, the SimCLR views and
NT-Xent by hand, the heads on the taps, relabelling through the plan, the config checks, exact resume of the
exit heads, and the saved student loading as a plain classifier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stillroom.config.domains import ClassifierArch
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.config.core import LossConfig, LossTerm, TrainConfig
from stillroom.domains.vision.data import ImageExample, collate_images
from stillroom.domains.vision.models import build_classifier, load_classifier, save_classifier
from stillroom.domains.vision.pseudo_labels import PseudoLabels
from stillroom.losses import LossMix
from stillroom.methods import METHODS
from stillroom.methods.base import MethodContext
from stillroom.methods.simclr import augment_views, nt_xent
from stillroom.methods.unfused import MultiExitForward, UnfusedObjective, exit_ce, exit_cosine, exit_kl, \
    plan_with_labels
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train
from stillroom.domains.vision.forward import ClassifierForward
from cli_helpers import assert_same_losses
from helpers import interrupted_copy

LN2 = math.log(2.0)


def test_exit_ce_by_hand():
    total, count = exit_ce(torch.zeros(1, 1, 2), torch.zeros(1, 2), torch.tensor([0]), alpha=0.7)
    assert count == 1 and float(total) == pytest.approx(1.7 * LN2)
    two_exits = exit_ce(torch.zeros(2, 3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 1]), alpha=0.5)
    assert float(two_exits[0]) == pytest.approx(3 * (2 * 0.5 + 1) * LN2) and two_exits[1] == 3


def test_exit_kl_by_hand_and_zero_when_equal():
    final = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [1/4, 3/4]
    total, count = exit_kl(torch.zeros(1, 1, 2), final, beta=0.3)  # exit softmax: [1/2, 1/2]
    by_hand = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert count == 1 and float(total) == pytest.approx(0.3 * by_hand)
    z = torch.randn(4, 5)
    assert float(exit_kl(z[None].repeat(2, 1, 1), z, beta=1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(exit_kl(torch.randn(2, 4, 5), z, beta=1.0)[0]) > 0


def test_exit_cosine_by_hand_and_scale_invariance():
    total, count = exit_cosine(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[1.0, 1.0]]), gamma=0.003)
    assert count == 1 and float(total) == pytest.approx(0.003 * (2 - math.sqrt(2)))
    z = torch.randn(3, 4)
    assert float(exit_cosine((5 * z)[None], z, gamma=1.0)[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(exit_cosine((-z)[None], z, gamma=1.0)[0]) == pytest.approx(3 * 4.0)


@pytest.mark.parametrize("term", [exit_kl, exit_cosine])
def test_detach_target_stops_the_gradient_into_the_final_logits(term):
    exits = torch.randn(2, 3, 4, requires_grad=True)
    final = torch.randn(3, 4, requires_grad=True)
    term(exits, final, 1.0, True)[0].backward()
    assert final.grad is None and exits.grad.abs().sum() > 0
    term(exits, final, 1.0, False)[0].backward()  # official parity: both sides move
    assert final.grad.abs().sum() > 0


def test_nt_xent_by_hand():
    assert float(nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.5)[0]) == pytest.approx(0.0, abs=1e-6)
    eye = torch.eye(2)
    total, count = nt_xent(eye, eye * 3.0, temperature=1.0)  # each anchor: positive cos 1, two negatives cos 0
    assert count == 2 and float(total) == pytest.approx(4 * (math.log(math.e + 2) - 1) / 2)
    lower_t = nt_xent(eye, eye, temperature=0.1)[0]
    assert float(lower_t) < float(total)  # sharper: the positive dominates more


def test_views_shift_noise_and_erase():
    images = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_views(images, g, shift=0, noise=0.0, erase=0), images)
    erased = augment_views(torch.ones(3, 1, 6, 6), g, shift=0, noise=0.0, erase=3)
    assert [(e == 0).sum().item() for e in erased] == [9, 9, 9]
    shifted = augment_views(images, g, shift=1, noise=0.0, erase=0)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for b in range(2):  # each view is one of the nine translations of its image
        options = [padded[b, :, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(shifted[b], o) for o in options)
    noisy = augment_views(torch.zeros(64, 1, 8, 8), g, shift=0, noise=0.1, erase=0)
    assert float(noisy.std()) == pytest.approx(0.1, rel=0.05)


def _student(seed=0):
    return build_classifier(ClassifierArch(kind="mlp", hidden=[16, 12, 8]), (1, 8, 8), 10, seed=seed)


def _cfg(**unfused):
    return RunConfig.model_validate({"domain": "classifier", "method": "unfused", "seed": 0,
                                     "loss": {"terms": [{"name": "ce"}]},
                                     "unfused": {"clusters": 4, **unfused}})


class _Data:
    class dataset:  # noqa: N801 - the slice of ImageSplits the plan reads
        in_shape = (1, 8, 8)


def _plan(cfg, student, labels):
    ctx = MethodContext(cfg=cfg, run_dir=None, model=student, data=_Data(), tokenizer=None, teacher_model=None,
                        vocab_size=10, topology=Topology(), mix=LossMix(LossConfig(terms=[LossTerm(name="ce")])),
                        log=lambda _m: None)
    return plan_with_labels(ctx, labels, "test")


def _examples(n=24):
    g = torch.Generator().manual_seed(3)
    return [ImageExample(torch.rand(1, 8, 8, generator=g), i % 10, f"x:{i}") for i in range(n)]


def test_heads_sit_on_the_taps_and_the_plan_relabels_batches():
    student = _student()
    labels = PseudoLabels({f"x:{i}": (i * 7) % 4 for i in range(24)}, 4, {})
    plan = _plan(_cfg(), student, labels)
    player = plan.players(Player("student", student, DistillObjective(ClassifierForward(student),
                                                                          LossMix(LossConfig(terms=[LossTerm(name="ce")])))))[0]
    heads = player.objective.state
    assert [h[0].in_features for h in heads.exits] == [16, 12] and heads.final.in_features == 8
    assert heads.final.out_features == 4 and all(h[-1].out_features == 4 for h in heads.exits)
    batch = collate_images(_examples()[:6])
    relabelled = plan.replace_batches([batch], 0)[0]
    assert relabelled.target_ids[:, 0].tolist() == [(i * 7) % 4 for i in range(6)]
    assert batch.target_ids[:, 0].tolist() == list(range(6))  # the prepared batch keeps its labels
    outputs = player.objective.forward(relabelled)
    assert outputs["exit_logits"].shape == (2, 6, 4) and outputs["final_logits"].shape == (6, 4)
    result = player.objective.loss(outputs, relabelled, None)
    ce, _ = exit_ce(outputs["exit_logits"], outputs["final_logits"], relabelled.target_ids[:, 0], 0.7)
    assert result.count == 6 and float(result.total.detach()) > float(ce.detach()) > 0
    with pytest.raises(KeyError, match="no pseudo-label"):
        labels.relabel(["y:0"])


def test_exits_see_the_layer_after_its_relu():
    student = _student()
    forward = MultiExitForward(student, torch.nn.Module(), ["layer.0"], "layer.2")
    images = torch.rand(3, 1, 8, 8)
    q = forward.features(images)
    assert torch.equal(q["layer.0"], torch.relu(student.layers[1](images.flatten(1))))


def test_config_checks():
    assert METHODS["unfused"].domains == ("classifier",)
    cfg = _cfg()
    assert (cfg.unfused.alpha, cfg.unfused.beta, cfg.unfused.gamma, cfg.unfused.detach_target) == (0.7, 0.3, 0.003, True)
    with pytest.raises(ValueError, match="loss.terms"):
        RunConfig.model_validate({"domain": "classifier", "method": "unfused", "loss": {"terms": [{"name": "forward_kl"}]}})
    with pytest.raises(ValueError, match="domain: classifier"):
        RunConfig.model_validate({"method": "unfused", "loss": {"terms": [{"name": "ce"}]}})
    with pytest.raises(ValueError, match="also in unfused.exits"):
        _cfg(exits=["layer.0", "layer.2"])
    with pytest.raises(ValueError, match="teacher_path"):
        _cfg(teacher_path="/x", ssl={"steps": 5})


def _job(tmp_path, name, steps, *, resume=False):
    student = _student()
    plan = _plan(_cfg(), student, PseudoLabels({f"x:{i}": i % 4 for i in range(24)}, 4, {}))
    base = Player("student", student, DistillObjective(ClassifierForward(student),
                                                        LossMix(LossConfig(terms=[LossTerm(name="ce")]))),
                  replace_batches=plan.replace_batches)  # as the classifier domain builds it
    players = plan.players(base)
    assert players[0].replace_batches is plan.replace_batches
    tc = TrainConfig(steps=steps, micro_batch_size=6, lr=0.05, warmup_steps=1, precision="fp32", save_every=2,
                     keep_checkpoints=10, weight_decay=0.0)
    return TrainJob(train=tc, seed=0, run_dir=tmp_path / name, run_name=name, players=players, examples=_examples(),
                    collate=collate_images, topology=Topology(), device=torch.device("cpu"), sampler=ExampleSampler,
                    resume=resume, log=lambda _m: None)


def test_four_steps_equal_two_steps_resume_two_steps_with_the_exit_heads(tmp_path):
    full = _job(tmp_path, "full", 4)
    heads0 = {k: v.clone() for k, v in full.players[0].objective.state.state_dict().items()}
    train(full)
    interrupted_copy(tmp_path / "full", "resumed", at_step=2)
    resumed = _job(tmp_path, "resumed", 4, resume=True)
    train(resumed)
    assert_same_losses(tmp_path / "resumed", tmp_path / "full", abs=1e-7)
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss/unfused_ce", "loss/unfused_kl", "loss/unfused_cos"} <= set(first)
    heads_full, heads_res = (j.players[0].objective.state.state_dict() for j in (full, resumed))
    assert all(torch.equal(heads_full[k], heads_res[k]) for k in heads_full)
    assert any(not torch.equal(heads0[k], heads_full[k]) for k in heads0)  # the heads did train


def test_saved_student_is_a_plain_classifier_without_the_exits(tmp_path):
    job = _job(tmp_path, "run", 2)
    train(job)
    save_classifier(job.players[0].model, tmp_path / "student")
    loaded = load_classifier(tmp_path / "student")
    assert set(loaded.state_dict()) == set(_student().state_dict()) and loaded.num_classes == 10
    images = torch.rand(2, 1, 8, 8)
    assert torch.allclose(loaded(images), job.players[0].model.eval()(images))


def test_truncated_tap_forward_matches_the_full_forward():
    """Parity of the fast path: the exits read taps of a forward stopped after the embedding layer."""
    student = _student()
    forward = MultiExitForward(student, torch.nn.Module(), ["layer.0", "layer.1"], "layer.2")
    images = torch.rand(4, 1, 8, 8)
    x, full = images.flatten(1), {}
    for name, i in (("layer.0", 1), ("layer.1", 3), ("layer.2", 5)):
        x = student.layers[i](x if i == 1 else torch.relu(x))
        full[name] = torch.relu(x)
    fast = forward.features(images)
    assert all(torch.allclose(fast[n], full[n], atol=1e-6) for n in full)
