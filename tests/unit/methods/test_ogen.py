"""OGEN's parts: the prompt head starts as zero-shot, the local mean teacher's window, the leave-one-class-out
generator, the loss by hand, and the shot sampler."""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from stillroom.config.ogen import OgenConfig
from stillroom.methods.ogen import OgenForward, OgenObjective, ShotSampler
from stillroom.methods.ogen_data import OgenData, split_classes
from stillroom.methods.ogen_parts import LocalMeanTeacher, PromptHead, nearest, train_generator


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_prompt_head_starts_as_the_zero_shot_classifier_and_moves_every_class():
    text, image = _features(6, 8, 0), _features(4, 8, 1)
    head = PromptHead(text, scale=10.0, image_adapter=True)
    assert torch.allclose(head.logits(image, text), 10.0 * image @ text.T, atol=1e-6)
    with torch.no_grad():
        head.residual.copy_(0.1 * torch.eye(8))
    assert torch.allclose(head.class_weights(), F.normalize(1.1 * text, dim=-1), atol=1e-6)
    flat = head.flat()
    assert flat.numel() == 2 * 64 and torch.equal(head.unflatten(flat)[0], head.residual.detach())


def test_local_mean_teacher_window_grows_and_averages_the_last_snapshots():
    lmt = LocalMeanTeacher(torch.zeros(2), capacity=3, ratio=0.5)
    assert [lmt.window(e) for e in (0, 1, 2, 5)] == [1, 1, 1, 2]
    for value in (1.0, 2.0, 3.0, 4.0):
        lmt.push(torch.full((2,), value))
    assert torch.equal(lmt.mean(0), torch.full((2,), 4.0))  # window 1: the newest
    assert torch.equal(lmt.mean(4), torch.full((2,), 3.5))  # window 2
    assert torch.equal(lmt.mean(100), torch.full((2,), 3.0))  # capped at 3 snapshots: 2, 3, 4
    again = LocalMeanTeacher(torch.zeros(2), capacity=3, ratio=0.5)
    again.load_state_dict(lmt.state_dict())
    assert torch.equal(again.mean(4), lmt.mean(4)) and int(again.count) == 5


def test_nearest_leaves_the_held_out_class_out():
    text = _features(5, 4, 2)
    idx = nearest(text, text, 2, exclude_q=torch.arange(5))
    assert not (idx == torch.arange(5)[:, None]).any()
    assert torch.equal(nearest(text, text, 1)[:, 0], torch.arange(5))  # without exclusion a class is its own nearest


def test_the_generator_learns_to_extrapolate_held_out_classes():
    d, classes = 8, 6
    text = _features(classes, d, 3)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(4))
    bank = [F.normalize(text[c] @ mix + 0.05 * torch.randn(10, d, generator=torch.Generator().manual_seed(c)), dim=-1)
            for c in range(classes)]
    _, losses = train_generator(text, bank, k=3, steps=300, lr=1e-2, seed=0)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20


def _objective(synthesis: bool, self_distill: bool):
    text = _features(4, 8, 5)
    head = PromptHead(text, scale=5.0, image_adapter=False)
    bank = [_features(3, 8, 10 + c) for c in range(2)]
    generator, _ = train_generator(text[:2], bank, k=1, steps=5, lr=1e-2, seed=0)
    data = OgenData([0, 1], [2, 3], text, text[2:], [0, 1, 2, 3], bank, _features(4, 8, 9), torch.tensor([0, 1, 2, 3]),
                    generator)
    s = OgenConfig(synthesis=synthesis, self_distill=self_distill, k_nn=1, window_ratio=0.5)
    forward = OgenForward(SimpleNamespace(image_features=lambda x: x), head)
    return OgenObjective(forward, data, s, seed=0, steps_per_epoch=1, synthetic=3, total_steps=4), head, text


def test_the_loss_is_base_cross_entropy_plus_synthesised_unknowns_and_self_distillation():
    batch = SimpleNamespace(inputs=_features(2, 8, 7), labels=torch.tensor([1, 0]), num_targets=2)
    plain, head, text = _objective(synthesis=False, self_distill=False)
    result = plain.loss(plain.forward(batch), batch, None)
    want = F.cross_entropy(5.0 * batch.inputs @ text[:2].T, torch.tensor([1, 0]), reduction="sum")
    assert math.isclose(float(result.total.detach()), float(want), rel_tol=1e-5) and result.count == 2
    full, _, _ = _objective(synthesis=True, self_distill=True)
    result = full.loss(full.forward(batch), batch, None)
    assert result.parts["sd"] == 0.0  # the mean teacher starts as the head itself
    feats, labels = full.synthesise(torch.device("cpu"))
    assert feats.shape == (3, 8) and set(labels.tolist()) <= {2, 3}
    assert torch.equal(full.synthesise(torch.device("cpu"))[0], feats)  # seeded by the step
    with torch.no_grad():
        full.head.residual.add_(0.3)
    full.after_step({}, 0, 4)
    assert int(full.state.step) == 1 and int(full.state.teacher.count) == 2


def test_shot_sampler_draws_only_the_shots_and_splits_classes():
    sampler = ShotSampler([5, 9, 11], n=100, batch_size=8, seed=0)
    drawn = [i for _ in range(4) for i in sampler.next_indices()]
    assert set(drawn) == {5, 9, 11}
    assert split_classes(10, None) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])


def _ogen_job(tmp, steps: int, resume: bool):
    from stillroom.config.core import TrainConfig
    from stillroom.data.batch import ExampleSampler
    from stillroom.domains.vl.clip_data import ClipExample, collate_clip
    from stillroom.train.distributed import Topology
    from stillroom.train.loop import Player, TrainJob

    objective, head, _ = _objective(synthesis=True, self_distill=True)
    images = _features(4, 8, 20)
    examples = [ClipExample(images[i], "x", f"u{i}", "digits", label=i % 2) for i in range(4)]
    tc = TrainConfig(steps=steps, micro_batch_size=2, clip_grad_norm=None, precision="fp32", warmup_steps=0,
                     schedule="constant", lr=0.05, save_every=2, keep_checkpoints=1, device="cpu")
    job = TrainJob(train=tc, seed=0, run_dir=tmp, run_name="t", players=[Player("prompt", head, objective)],
                   examples=examples, collate=collate_clip, topology=Topology(), device=torch.device("cpu"),
                   sampler=ExampleSampler, resume=resume, log=lambda _m: None, unit="img")
    return job, head, objective


def test_ogen_trains_through_the_loop_and_resumes_exactly(tmp_path):
    from stillroom.train.loop import train

    job, whole, whole_objective = _ogen_job(tmp_path / "whole", 4, False)
    train(job)
    assert whole.residual.detach().abs().sum() > 0 and int(whole_objective.state.teacher.count) == 5
    train(_ogen_job(tmp_path / "part", 2, False)[0])
    resumed_job, resumed, resumed_objective = _ogen_job(tmp_path / "part", 4, True)
    train(resumed_job)
    assert torch.equal(resumed.residual.detach(), whole.residual.detach())
    assert torch.equal(resumed_objective.state.teacher.snapshots, whole_objective.state.teacher.snapshots)


def test_ogen_refuses_several_processes_before_any_work():
    import pytest

    from stillroom.methods.ogen import METHOD

    ctx = SimpleNamespace(cfg=SimpleNamespace(ogen=OgenConfig()), topology=SimpleNamespace(world_size=2))
    with pytest.raises(ValueError, match="without torchrun"):
        METHOD.build(ctx)
