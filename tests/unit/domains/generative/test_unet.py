"""The ``unet`` denoiser kind: diffusers' UNet2DModel wrapped as a class-conditional Denoiser."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.models import DENOISER_KINDS, build_denoiser, load_denoiser, save_denoiser
from stillroom.domains.generative.unet import UNetDenoiser, check_unet_arch, unet_arch

TINY = {"channels": [8, 16], "layers_per_block": 1}


def tiny_unet(convention: str = "edm", size: int = 8, classes: int = 3, seed: int = 0) -> UNetDenoiser:
    arch = unet_arch(sample_shape=[1, size, size], **TINY)
    return build_denoiser("unet", arch, num_classes=classes, convention=Convention(convention), seed=seed)


def test_unet_is_registered_and_built_from_a_seed():
    assert DENOISER_KINDS["unet"] is UNetDenoiser
    a, b, c = tiny_unet(seed=1), tiny_unet(seed=1), tiny_unet(seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    assert a.unet.class_embedding.num_embeddings == 4  # 3 classes + the null label


@pytest.mark.parametrize("convention", ["edm", "rf", "flow_clean"])
def test_forward_with_class_and_null_labels(convention):
    model = tiny_unet(convention).eval()
    conv = model.convention
    x_t = torch.randn(4, 1, 8, 8)
    t_b = conv.time(torch.tensor([0.1, 0.4, 0.7, 1.0]))
    with torch.no_grad():
        x0_class = model(x_t, t_b, torch.tensor([0, 1, 2, 0]))
        x0_null = model(x_t, t_b, torch.full((4,), model.null_label))
    assert x0_class.shape == x_t.shape and torch.isfinite(x0_null).all()
    assert not torch.allclose(x0_class, x0_null)  # the class embedding reaches the output
    # the network's raw output goes through the convention's parameterisation, not straight out
    x_in, time_b = conv.net_input(x_t, t_b)
    with torch.no_grad():
        raw = model.raw(x_in, time_b, torch.full((4,), model.null_label))
    assert torch.allclose(conv.x0_from_output(x_t, t_b, raw), x0_null, atol=1e-6)


def test_28x28_mnist_size_with_three_levels():
    arch = unet_arch(sample_shape=(1, 28, 28), channels=[8, 16, 16])
    model = build_denoiser("unet", arch, num_classes=10, convention=Convention("rf"), seed=0)
    assert model.sample_shape() == (1, 28, 28)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([0.5, 0.9]), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 28, 28)
    wide = build_denoiser("unet", unet_arch(sample_shape=[3, 8, 16], channels=[8, 16]), num_classes=2,
                          convention=Convention("edm"), seed=0)
    assert wide(torch.randn(2, 3, 8, 16), torch.tensor([0.5, 9.0]), torch.tensor([0, 2])).shape == (2, 3, 8, 16)


def test_sizes_the_unet_cannot_take_are_refused_with_the_setting_named():
    with pytest.raises(ValueError, match=r"generative\.teacher\.arch: image size 28 is not divisible by "
                                         r"2\*\*\(levels-1\)=8 .*use at most 3 levels"):
        unet_arch(sample_shape=[1, 28, 28], channels=[8, 16, 32, 64])
    arch = unet_arch(sample_shape=[1, 8, 8], **TINY)
    with pytest.raises(ValueError, match=r"generative\.student\.arch: image size 6 .*2\*\*\(levels-1\)=4"):
        check_unet_arch({**arch, "sample_shape": [1, 8, 6], "channels": [8, 16, 16]}, "generative.student.arch")
    with pytest.raises(ValueError, match="norm_num_groups 8 does not divide channels \\[12\\]; use 4"):
        unet_arch(sample_shape=[1, 8, 8], channels=[8, 12], norm_num_groups=8)
    with pytest.raises(ValueError, match="generative.student.arch: unknown unet fields \\['width'\\]"):
        unet_arch(sample_shape=[1, 8, 8], where="generative.student.arch", width=3)
    with pytest.raises(ValueError, match="sample_shape \\[64\\] is not one"):
        unet_arch(sample_shape=[64])


def test_a_batch_of_another_image_size_is_refused():
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"built for images \[1, 8, 8\].*got a batch of \[2, 1, 16, 16\]"):
        model(torch.randn(2, 1, 16, 16), torch.ones(2), torch.zeros(2, dtype=torch.long))


def test_save_load_round_trip_and_plain_diffusers_loads_the_folder(tmp_path):
    from diffusers import UNet2DModel

    model = tiny_unet("edm", classes=3, seed=5).eval()
    with torch.no_grad():  # move off the initialisation so a forgotten load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "teacher"
    save_denoiser(model, folder, extra={"steps": 7})
    info = json.loads((folder / "denoiser.json").read_text())
    assert info["kind"] == "unet" and info["num_classes"] == 3 and info["steps"] == 7
    assert info["convention"]["name"] == "edm"
    assert not list(tmp_path.glob(".tmp-*"))

    loaded = load_denoiser(folder).eval()
    x_t, t_b, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 20.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(model(x_t, t_b, labels), loaded(x_t, t_b, labels))
        plain = UNet2DModel.from_pretrained(str(folder)).eval()  # no stillroom code
        x_in, time_b = model.convention.net_input(x_t, t_b)
        raw = plain(x_in, time_b * info["arch"]["time_scale"], class_labels=labels).sample
        assert torch.equal(raw, model.raw(x_in, time_b, labels))


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "stillroom\[generative\]"'):
        tiny_unet()


def test_trains_as_a_denoiser():
    """A few AdamW steps of the x0 regression on one fixed batch lower its loss (gradients reach the UNet)."""
    model = tiny_unet("rf", seed=3)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(8, 1, 8, 8, generator=gen)
    t_b, labels = torch.rand(8, generator=gen) * 0.8 + 0.1, torch.arange(8) % 4
    x_t = model.convention.renoise(x0, t_b, eps)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = ((model(x_t, t_b, labels) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
