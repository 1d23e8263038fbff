"""The mae domain's pieces: deterministic masks, the MAE loss (hand value and HF parity), exact resume through
the loop, the unmasked encoder, the linear probe and the MAE -> ViT classifier conversion."""

import pytest
import torch
from safetensors.torch import load_file

from stillroom.config.schema import RunConfig
from stillroom.domains.vision.data import ImageBatch
from stillroom.domains.vision.hf_models import build_vit_mae
from stillroom.domains.vision.mae import (
    MaeForward, encode_unmasked, load_mae, mae_loss, mask_noise, save_mae, shift_images, to_pixel_values,
)
from stillroom.domains.vision.mae_domain import MaeDomain
from stillroom.domains.vision.models import load_classifier, save_classifier
from stillroom.domains.vision.probe import linear_probe, mae_to_classifier
from stillroom.methods import METHODS
from stillroom.train.distributed import Topology
from stillroom.train.loop import train


def tiny_mae(**kw):
    return build_vit_mae((1, 8, 8), hidden_size=16, layers=2, heads=2, decoder_hidden_size=16, decoder_layers=1,
                         seed=kw.pop("seed", 0), **kw)


def test_mask_noise_is_a_function_of_seed_step_and_image():
    a = mask_noise(["x", "y"], 0, 3, 16)
    assert torch.equal(a, mask_noise(["x", "y"], 0, 3, 16))
    assert torch.equal(a[1], mask_noise(["y"], 0, 3, 16)[0])  # independent of the batch it is in
    assert not torch.equal(a[0], mask_noise(["x"], 0, 4, 16)[0])
    assert not torch.equal(a[0], mask_noise(["x"], 1, 3, 16)[0])


def test_mae_loss_hand_value():
    """p=1, one channel on 2x2 images: 4 patches of 1 pixel; masked patches 1 and 3 of image 0 (error 1 and 3)
    and 0 and 1 of image 1 (error 2 and 0): per-image means 5 and 2, sum 7 over 2 images."""
    model = build_vit_mae((1, 2, 2), patch_size=1, hidden_size=4, layers=1, heads=1, decoder_hidden_size=4,
                          decoder_heads=1, mask_ratio=0.5)
    pixels = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[9.0, 1.0, 9.0, 3.0 ** 0.5], [2.0 ** 0.5, 0.0, 9.0, 9.0]])[..., None]
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    total, count = mae_loss(model, pixels, pred, mask)
    assert count == 2 and total.item() == pytest.approx((1 + 3) / 2 + (2 + 0) / 2)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_equals_hf_loss(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    pixels = to_pixel_values(torch.rand(5, 1, 8, 8))
    out = model(pixel_values=pixels, noise=mask_noise(list("abcde"), 0, 0, 16))
    total, count = mae_loss(model, pixels, out.logits, out.mask)
    assert (total / count).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_shift_moves_pixels_and_zero_shift_is_identity():
    images = torch.rand(3, 1, 8, 8)
    assert shift_images(images, list("abc"), 0, 0, 0) is images
    shifted = shift_images(images, list("abc"), 0, 0, 1)
    assert shifted.shape == images.shape and torch.equal(shifted, shift_images(images, list("abc"), 0, 0, 1))


def test_unmasked_encoder_sees_every_patch_in_any_order():
    model = tiny_mae().eval()
    images = torch.rand(3, 1, 8, 8)
    tokens = encode_unmasked(model, images)
    assert tokens.shape == (3, 17, 16) and model.config.mask_ratio == 0.75  # restored
    model.config.mask_ratio = 0.0
    shuffled = model.vit(pixel_values=to_pixel_values(images), noise=torch.rand(3, 16)).last_hidden_state
    assert torch.allclose(shuffled[:, 0], tokens[:, 0], atol=1e-5)  # [CLS] does not depend on the patch order


def test_mae_to_classifier_round_trip(tmp_path):
    """The converted ViT classifier's encoder is the MAE encoder ([CLS] outputs equal), and its folder loads
    back through load_classifier (what classifier.student_path uses) with equal logits."""
    mae = tiny_mae(seed=3)
    save_mae(mae, tmp_path / "mae")
    mae = load_mae(tmp_path / "mae", "test").eval()
    classifier = mae_to_classifier(mae, 10, seed=1).eval()
    images = torch.rand(4, 1, 8, 8)
    vit_cls = classifier.model.vit(pixel_values=to_pixel_values(images)).last_hidden_state[:, 0]
    assert torch.allclose(vit_cls, encode_unmasked(mae, images)[:, 0], atol=1e-5)
    save_classifier(classifier, tmp_path / "vit", extra={"classes": [str(i) for i in range(10)]})
    loaded = load_classifier(tmp_path / "vit")
    assert torch.allclose(loaded(images), classifier(images), atol=1e-6)
    on_disk = load_file(str(tmp_path / "vit" / "model.safetensors"))  # transformers' checkpoint names, both
    mae_disk = load_file(str(tmp_path / "mae" / "model.safetensors"))
    encoder = [k for k in on_disk if not k.startswith("classifier.")]
    assert len(encoder) == len([k for k in mae_disk if k.startswith("vit.")]) > 20
    assert all(torch.equal(on_disk[k], mae_disk[k]) for k in encoder)


def test_load_mae_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="mae.student_path"):
        load_mae(tmp_path, "mae.student_path")


def test_linear_probe_beats_chance_on_digits():
    from stillroom.domains.vision.data import build_image_splits

    data = build_image_splits("digits", 0.2)
    acc = linear_probe(tiny_mae(), data.train[:300], data.heldout[:200], max_iter=200)
    assert 0.25 < acc <= 1.0


def _cfg(tmp_path, steps, method="dmae"):
    return RunConfig.model_validate({
        "name": "r", "output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"), "domain": "mae",
        "method": method, "mae": {"shift": 1, "student": {"hidden_size": 16, "layers": 2, "decoder_hidden_size": 16,
                                                           "decoder_layers": 1},
                                  "teacher": {"arch": {"hidden_size": 16, "layers": 3, "decoder_hidden_size": 16,
                                                       "decoder_layers": 1}, "steps": 3, "batch_size": 32}},
        "train": {"steps": steps, "micro_batch_size": 16, "lr": 1e-3, "warmup_steps": 0, "schedule": "constant",
                  "precision": "fp32",
                  "keep_checkpoints": 1, "save_every": 1}})


def _train(tmp_path, run_dir, steps, resume, method="dmae"):
    cfg = _cfg(tmp_path, steps, method)
    method_obj = METHODS[method]
    prep = MaeDomain().prepare(cfg, Topology(), method_obj, lambda m: None)
    job, _ = prep.job(prep.student, method_obj, baseline=False, run_dir=run_dir, resume=resume, log=lambda m: None)
    train(job)
    return prep.student.state_dict(), job.players[0].objective.state.state_dict()


@pytest.mark.parametrize("method", ["dmae", "sft"])
def test_resume_2_plus_2_equals_4(tmp_path, method):
    """A constant schedule, so the 2-step session's learning rates are the 4-step run's: what must carry over is
    the weights, the optimizer, the sampler, the projectors and the mask clock."""
    whole, whole_state = _train(tmp_path, tmp_path / "a", 4, False, method)
    _train(tmp_path, tmp_path / "b", 2, False, method)
    resumed, resumed_state = _train(tmp_path, tmp_path / "b", 4, True, method)
    assert int(resumed_state["clock.step"]) == 4
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    for k in whole_state:
        assert torch.equal(whole_state[k], resumed_state[k]), k


def test_forward_masks_follow_the_clock():
    model = tiny_mae()
    forward = MaeForward(model, seed=0)
    batch = ImageBatch(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.long), ["a", "b"])
    first = forward(batch)["mask"]
    assert torch.equal(first, forward(batch)["mask"])
    forward.clock.step.fill_(1)
    assert first.sum() == forward(batch)["mask"].sum() == 2 * 12 and not torch.equal(first, forward(batch)["mask"])


def test_mae_domain_refuses_other_methods(tmp_path):
    cfg = _cfg(tmp_path, 1, "sft")
    with pytest.raises(ValueError, match="domain: mae takes method"):
        MaeDomain().prepare(cfg, Topology(), METHODS["kd"], lambda m: None)
