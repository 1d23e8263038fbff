"""FerKD: marginal smoothing, region sets and adapted targets by hand, SelfMix's box, lambda and target by
hand, dropped views outside the gradient, the soft-CE target recovered exactly, and exact resume 2 + 2 = 4."""

from __future__ import annotations

import json
import random

import pytest
import torch

from stillroom.config.core import LossConfig, LossTerm, TrainConfig
from stillroom.config.domains import ClassifierArch
from stillroom.config.methods import FerKDConfig
from stillroom.config.schema import RunConfig
from stillroom.data.batch import ExampleSampler
from stillroom.domains.vision.data import ImageExample, collate_images
from stillroom.domains.vision.forward import ClassifierForward
from stillroom.domains.vision.models import build_classifier
from stillroom.domains.vision.selfmix import area_lambda, cutmix_box, draw_mix, mix_targets, paste_boxes
from stillroom.domains.vision.views import TrainingViews, epoch_view_index
from stillroom.losses import LossMix
from stillroom.methods import METHODS
from stillroom.methods.base import StepCounts
from stillroom.methods.ferkd import (
    CALIBRATE, DISCARD, KEEP, AdaptedTargets, FerKDRun, build_region_table, marginal_smoothing, region_sets,
)
from stillroom.train.distributed import Topology
from stillroom.train.loop import DistillObjective, Player, TrainJob, train
from cli_helpers import assert_same_losses
from helpers import interrupted_copy


def test_marginal_smoothing_spreads_the_tail_evenly():
    ids = torch.tensor([[3, 1]])
    lp = torch.tensor([[0.6, 0.1]]).log()
    tail = torch.tensor([0.3]).log()
    probs = marginal_smoothing(ids, lp, tail, 5)
    assert probs.tolist()[0] == pytest.approx([0.1, 0.1, 0.1, 0.6, 0.1])  # (1 - 0.7) / (5 - 2) on 0, 2, 4
    full = marginal_smoothing(torch.tensor([[1, 0]]), torch.tensor([[0.75, 0.25]]).log(), torch.tensor([-float("inf")]), 2)
    assert full.tolist()[0] == pytest.approx([0.25, 0.75])  # k = C: nothing to spread


CONF = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2, 0.95, 0.3, 0.6]])


def test_region_sets_by_rank_and_by_threshold():
    s = FerKDConfig(discard_top_frac=0.25, calibrate_bottom_frac=0.25)
    K, C, D = KEEP, CALIBRATE, DISCARD
    assert region_sets(CONF, s).tolist() == [[D, C, K, K, C, D, K, K]]  # top 2: 0.95, 0.9; bottom 2: 0.1, 0.2
    s = FerKDConfig(discard_top_frac=0.25, calibrate_bottom_frac=0.25, tau_low=0.35, tau_high=0.65)
    assert region_sets(CONF, s).tolist() == [[D, C, K, D, C, D, C, K]]  # + 0.3 < tau_low, 0.7 >= tau_high
    defaults = region_sets(CONF, FerKDConfig())  # floor(0.1 * 8) = 0 dropped, floor(0.25 * 8) = 2 calibrated
    assert defaults.tolist() == [[K, C, K, K, C, K, K, K]]
    ties = region_sets(torch.full((1, 4), 0.5), FerKDConfig(discard_top_frac=0.25, calibrate_bottom_frac=0.25))
    assert ties.tolist() == [[D, K, K, C]]  # equal c_r: the lower view index ranks as more confident


def _hand_table(s: FerKDConfig):
    """One image (label 3, C = 5), R = 4 views stored top-2; view 0 confident, view 3 mostly background."""
    ids = torch.tensor([[[3, 1], [3, 0], [1, 3], [2, 4]]])
    probs = torch.tensor([[[0.9, 0.04], [0.6, 0.2], [0.5, 0.3], [0.4, 0.3]]])
    tail = (1 - probs.sum(-1)).log()
    boxes = torch.tensor([[[0, 0, 8, 8], [1, 1, 6, 6], [2, 0, 5, 7], [0, 3, 4, 4]]])
    return build_region_table(["a"], torch.tensor([3]), ids, probs.log(), tail, boxes, torch.zeros(1, 4, dtype=torch.bool), 5, s)


def test_adapted_targets_of_a_hand_built_store():
    table = _hand_table(FerKDConfig(discard_top_frac=0.25, calibrate_bottom_frac=0.25, eps=0.1))
    # c_r: view 0 0.9, view 1 0.6, view 2 0.3, view 3: outside the top 2 -> (1 - 0.7) / 3 = 0.1
    assert table.conf_nr.tolist()[0] == pytest.approx([0.9, 0.6, 0.3, 0.1])
    assert table.kind_nr.tolist() == [[DISCARD, KEEP, KEEP, CALIBRATE]]
    t = table.targets_nrc[0]
    assert t[1].tolist() == pytest.approx([0.2, 0.2 / 3, 0.2 / 3, 0.6, 0.2 / 3])  # kept: p_T, tail 0.2 over 3
    assert t[3].tolist() == pytest.approx([0.02, 0.02, 0.02, 0.92, 0.02])  # (1 - eps) onehot(3) + eps / 5
    mixed = _hand_table(FerKDConfig(discard_top_frac=0.25, calibrate_bottom_frac=0.25, eps=0.1,
                                    calibrate_target="mix", mix_weight=0.5)).targets_nrc[0, 3]
    p3 = [0.1, 0.1, 0.4, 0.1, 0.3]
    assert mixed.tolist() == pytest.approx([0.5 * g + 0.5 * p for g, p in zip([0.02, 0.02, 0.02, 0.92, 0.02], p3)])


def test_selfmix_box_lambda_and_target_by_hand():
    assert area_lambda((2, 3, 4, 5), (16, 16)) == pytest.approx(1 - 20 / 256)
    g, ref = random.Random(7), random.Random(7)
    lam = 0.75
    box = cutmix_box(lam, (16, 16), g)
    cy, cx = ref.randrange(16), ref.randrange(16)  # side 16 * sqrt(0.25) = 8, centred at (cy, cx), clipped
    top, left = max(cy - 4, 0), max(cx - 4, 0)
    assert box == (top, left, min(cy + 4, 16) - top, min(cx + 4, 16) - left)
    first, second = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    pasted = paste_boxes(first, second, [(1, 2, 2, 2)])
    assert pasted.sum() == 4 and pasted[0, 0, 1:3, 2:4].eq(1).all()
    assert mix_targets(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0.75])).tolist() == \
        [[0.75, 0.25]]
    d = draw_mix(0, 5, "a", 1, [1, 2, 3], 1.0, (16, 16))
    assert d.second_view in (2, 3) and d.lam == pytest.approx(area_lambda(d.box, (16, 16)))
    assert draw_mix(0, 5, "a", 1, [1, 2, 3], 1.0, (16, 16)) == d  # seeded by (seed, step, uid) alone
    assert len({draw_mix(0, s, "a", 1, [1, 2, 3], 1.0, (16, 16)) for s in range(8)}) > 1
    assert draw_mix(0, 5, "a", 1, [1], 1.0, (16, 16)).second_view == 1  # no other usable view: itself


def _setup(n_images=6, views=4, seed=0, **ferkd):
    s = FerKDConfig(**ferkd)
    g = torch.Generator().manual_seed(seed)
    examples = [ImageExample(torch.rand(1, 8, 8, generator=g), i % 5, f"x:{i}") for i in range(n_images)]
    logits = torch.randn(n_images, views, 5, generator=g) * 2
    lp, ids = torch.log_softmax(logits, -1).topk(3, dim=-1)
    tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))
    tops = torch.randint(0, 4, (n_images, views, 2), generator=g)
    boxes = torch.cat([tops, torch.full((n_images, views, 2), 4)], -1)
    flips = torch.randint(0, 2, (n_images, views), generator=g).bool()
    table = build_region_table([e.uid for e in examples], torch.tensor([e.label for e in examples]), ids, lp, tail,
                               boxes, flips, 5, s)
    return s, examples, table


class TableViews:
    """A view source reading the stored views of a region table (as :class:`StoredViews` reads a store)."""

    def __init__(self, table, seed):
        self.table, self.seed = table, seed

    def views(self, uids, epoch):
        r = self.table.kind_nr.shape[1]
        v = torch.tensor([epoch_view_index(self.seed, u, epoch, r) for u in uids])
        rows = torch.tensor([self.table.row_of[u] for u in uids])
        return v, self.table.boxes_nr4[rows, v], self.table.flips_nr[rows, v]


def _student():
    return build_classifier(ClassifierArch(kind="mlp", hidden=[8]), (1, 8, 8), 5, seed=1)


def test_a_dropped_view_contributes_nothing_to_the_gradient():
    s, examples, table = _setup(discard_top_frac=0.25, calibrate_bottom_frac=0.25)
    run = FerKDRun(s, 0, examples, lambda: table, 1.0)
    views = TrainingViews(TableViews(table, 0), collate_images)
    batch = views.collate(examples[:4])
    kinds = table.kind_nr[torch.arange(4), batch.view_ids]
    assert (kinds == DISCARD).any() and (kinds != DISCARD).any(), kinds
    mix = LossMix(LossConfig(terms=[LossTerm(name="soft_ce")]))

    def grads(micro, n):
        model = _student()
        weights = run.weights(micro, StepCounts(0, n, lambda x: x))
        objective = DistillObjective(ClassifierForward(model), mix, AdaptedTargets(1.0))
        total = 0
        for b, w in zip(micro, weights):
            b.target_weight = w
            total = total + objective.loss(objective.forward(b), b, objective.signal(b)).total
        (total / n).backward()
        return [p.grad.clone() for p in model.parameters()], float(total.detach() / n)

    adapted = run.adapt([batch], 0)
    g_all, loss_all = grads(adapted, 4)
    changed = run.adapt([batch], 0)[0]
    changed.inputs = changed.inputs.clone()
    changed.inputs[kinds == DISCARD] = torch.rand_like(changed.inputs[kinds == DISCARD])  # a dropped row's pixels
    g_changed, _ = grads([changed], 4)
    kept = [ex for ex, k in zip(examples[:4], kinds) if k != DISCARD]
    g_kept, loss_kept = grads(run.adapt([views.collate(kept)], 0), len(kept))  # the dropped rows left out
    assert loss_all == pytest.approx(loss_kept, abs=1e-6)
    for a, b, c in zip(g_all, g_changed, g_kept):
        assert torch.allclose(a, b, atol=1e-7) and torch.allclose(a, c, atol=1e-6)


def test_the_loss_sees_the_adapted_targets_at_any_temperature():
    _, _, table = _setup()
    targets = table.targets_nrc[:, 0]
    from stillroom.methods.ferkd import FerKDBatch

    batch = FerKDBatch(torch.zeros(6, 1, 8, 8), torch.zeros(6, 1, dtype=torch.long), [str(i) for i in range(6)],
                       targets_bc=targets, keep_b=torch.ones(6, dtype=torch.bool))
    z = torch.randn(6, 1, 5)
    for temperature in (1.0, 2.0):
        logits = AdaptedTargets(temperature).signal(batch).logits_btv
        assert torch.allclose(torch.softmax(logits / temperature, -1)[:, 0], targets, atol=1e-6)
    mix = LossMix(LossConfig(terms=[LossTerm(name="soft_ce")]))
    from stillroom.losses import StudentOutput

    got = mix(StudentOutput(logits_btv=z), AdaptedTargets(1.0).signal(batch), batch.target_ids, batch.loss_mask)
    hand = -(targets * torch.log_softmax(z[:, 0], -1)).sum()
    assert float(got.total) == pytest.approx(float(hand), rel=1e-5) and got.count == 6


def _job(tmp_path, name, steps, *, resume=False):
    s, examples, table = _setup(n_images=12, discard_top_frac=0.25, selfmix=True)
    cfg = RunConfig.model_validate({"domain": "classifier", "method": "ferkd", "seed": 0,
                                    "classifier": {"teacher_source": "store", "augment": {"enabled": True}},
                                    "loss": {"terms": [{"name": "soft_ce"}]}})
    run = FerKDRun(s, cfg.seed, examples, lambda: table, 1.0)
    model = _student()
    mix = LossMix(cfg.loss)
    views = TrainingViews(TableViews(table, 0), collate_images)
    student = Player("student", model, DistillObjective(ClassifierForward(model), mix, AdaptedTargets(1.0)),
                     replace_batches=run.adapt, weight_targets=run.weights)
    tc = TrainConfig(steps=steps, micro_batch_size=4, grad_accum=2, lr=0.05, warmup_steps=1, precision="fp32",
                     save_every=2, keep_checkpoints=10, weight_decay=0.0)
    return TrainJob(train=tc, seed=0, run_dir=tmp_path / name, run_name=name, players=run.players(student),
                    examples=examples, collate=views.collate, topology=Topology(), device=torch.device("cpu"),
                    sampler=views.track(ExampleSampler), metrics=run.metrics, resume=resume, log=lambda _m: None)


def test_four_steps_equal_two_steps_then_resumed_two_with_selfmix(tmp_path):
    full = _job(tmp_path, "full", 4)
    train(full)
    interrupted_copy(tmp_path / "full", "resumed", at_step=2)
    resumed = _job(tmp_path, "resumed", 4, resume=True)
    train(resumed)
    assert_same_losses(tmp_path / "resumed", tmp_path / "full", abs=1e-7, steps=4)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["ferkd/selfmix_lambda"] <= 1 for r in rows)
    for a, b in zip(full.players[0].model.state_dict().values(), resumed.players[0].model.state_dict().values()):
        assert torch.equal(a, b)


def test_config_checks():
    base = {"domain": "classifier", "method": "ferkd", "loss": {"terms": [{"name": "soft_ce"}]},
            "classifier": {"teacher_source": "store", "augment": {"enabled": True}}}
    assert RunConfig.model_validate(base).ferkd == FerKDConfig()
    with pytest.raises(ValueError, match="teacher_source: store"):
        RunConfig.model_validate({**base, "classifier": {}})
    with pytest.raises(ValueError, match="exceed 1"):
        RunConfig.model_validate({**base, "ferkd": {"discard_top_frac": 0.5, "calibrate_bottom_frac": 0.6}})
    with pytest.raises(ValueError, match="need a teacher term"):
        RunConfig.model_validate({**base, "loss": {"terms": [{"name": "ce"}]}})
    assert METHODS["ferkd"].domains == ("classifier",)


def test_cluttered_digits_are_fixed_and_centred_where_held_out():
    import numpy as np
    from sklearn.datasets import load_digits

    from stillroom.domains.vision import cluttered
    from stillroom.domains.vision.datasets import load_dataset

    ds = load_dataset("cluttered_digits")
    assert ds.in_shape == (1, 16, 16) and ds.num_classes == 10 and len(ds.labels) == 1797
    assert 0.22 < float(ds.heldout.float().mean()) < 0.34
    again = load_dataset("cluttered_digits")
    assert torch.equal(ds.images, again.images) and torch.equal(ds.labels, again.labels)
    digits = np.asarray(load_digits().images, dtype=np.float32) / 16.0
    held_rows = np.flatnonzero(cluttered.heldout_digits(len(digits)))
    train_n = int((~ds.heldout).sum())
    canvas = ds.images[train_n].numpy()[0]  # the first held-out image: that digit laid over the centre
    assert (canvas[4:12, 4:12] >= digits[held_rows[0]]).all() and canvas[4:12, 4:12].max() == digits[held_rows[0]].max()
    strokes = (canvas > 0).sum() - (digits[held_rows[0]] > 0).sum()
    assert strokes > 0  # background strokes outside the digit
