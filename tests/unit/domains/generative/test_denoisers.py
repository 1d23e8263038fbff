"""Denoiser folders, the sampler and classifier-free guidance."""

import json

import pytest
import torch

from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.models import (
    DENOISER_FILE, MlpDenoiser, build_denoiser, load_denoiser, save_denoiser,
)
from stillroom.domains.generative.sampling import generate, guided_x0, sample

ARCH = {"dim": 2, "width": 16, "depth": 2, "time_features": 8, "class_features": 4}


def tiny(conv: Convention = Convention("edm"), seed: int = 0) -> MlpDenoiser:
    return build_denoiser("mlp", ARCH, num_classes=3, convention=conv, seed=seed)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = tiny(seed=1), tiny(seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_save_load_round_trip(tmp_path):
    model = tiny(Convention("rf"))
    save_denoiser(model, tmp_path / "m", extra={"note": "x"})
    info = json.loads((tmp_path / "m" / DENOISER_FILE).read_text())
    assert info["kind"] == "mlp" and info["convention"]["name"] == "rf" and info["note"] == "x"
    loaded = load_denoiser(tmp_path / "m")
    x, t, labels = torch.randn(4, 2), torch.rand(4), torch.tensor([0, 1, 2, 3])
    assert torch.equal(model(x, t, labels), loaded(x, t, labels))
    assert not list(tmp_path.glob(".tmp-*"))


def test_load_refuses_a_folder_without_denoiser_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="generative.teacher.path: .* is not a denoiser folder"):
        load_denoiser(tmp_path, "generative.teacher.path")


def test_one_step_generation_is_the_x0_prediction_at_pure_noise():
    model = tiny()
    z = model.convention.prior((5, 2), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1])
    t = model.convention.time(torch.ones(5))
    assert torch.allclose(generate(model, z, labels, steps=1), model(z, t, labels))


def test_guidance_one_is_the_conditional_prediction_and_cfg_extrapolates():
    model = tiny()
    x, t, labels = torch.randn(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0])
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, 3))
    assert torch.allclose(guided_x0(model, x, t, labels, 1.0), cond)
    assert torch.allclose(guided_x0(model, x, t, labels, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-6)


def test_generate_is_differentiable_and_sample_is_not():
    model = tiny()
    z = torch.randn(3, 2) * 80
    out = generate(model, z, torch.tensor([0, 1, 2]), steps=2)
    out.sum().backward()
    assert model.head.weight.grad is not None
    s = sample(model, torch.tensor([0, 1, 2]), steps=2, generator=torch.Generator().manual_seed(0))
    assert not s.requires_grad and s.shape == (3, 2)


def test_sample_is_reproducible_and_batched_sampling_agrees():
    model = tiny(Convention("flow_clean"))
    labels = torch.arange(10) % 3
    a = sample(model, labels, steps=3, generator=torch.Generator().manual_seed(0))
    b = sample(model, labels, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_deterministic_sampler_is_exact_for_a_perfect_denoiser():
    """A denoiser that always predicts the same x0 (a one-point data set) is sampled exactly in any step count,
    under every convention: the DDIM step keeps the implied noise, so the last step returns x0."""

    class Point(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.convention, self.num_classes, self.w = conv, 1, torch.nn.Parameter(torch.zeros(1))

        null_label = 1

        def forward(self, x_t, t_b, labels_b):
            return torch.tensor([[0.3, -0.7]]).expand_as(x_t) + 0 * self.w

        def sample_shape(self):
            return (2,)

    for conv in (Convention("edm"), Convention("rf"), Convention("flow_clean")):
        out = sample(Point(conv), torch.zeros(4, dtype=torch.long), steps=5, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, torch.tensor([[0.3, -0.7]]).expand(4, 2), atol=1e-5)


def test_edm_sampler_matches_diffusers_edm_euler_scheduler():
    """Our deterministic sampler on diffusers' sigma ramp (noise fractions 1 .. 0) is diffusers' EDMEulerScheduler
    step for step: the same Karras sigmas, c_in / c_noise input scaling, preconditioned output and Euler step."""
    from diffusers import EDMEulerScheduler

    conv = Convention("edm", sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5)
    model = tiny(conv).double()
    labels = torch.tensor([0, 1, 2, 1])
    z = conv.prior((4, 2), generator=torch.Generator().manual_seed(3)).double()
    steps = 6
    ours = generate(model, z, labels, steps=steps, fractions=torch.linspace(1, 0, steps).tolist())

    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, prediction_type="epsilon")
    sched.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            out = model.raw(x_in, torch.full((4,), float(t), dtype=torch.float64), labels)
            x = sched.step(out, t, x).prev_sample
    assert torch.allclose(ours.detach(), x, atol=1e-5)  # diffusers keeps its sigmas in float32


def test_a_student_schedule_of_noise_fractions_is_what_the_report_samples():
    """generative.student.fractions (e.g. a released 2-NFE schedule) reaches the report's sampler; bad ones are
    refused when the recipe loads, and dmd (trained at evenly spaced fractions) refuses any."""
    from stillroom.config.schema import RunConfig
    from stillroom.domains.generative.evaluate import sampler_settings

    cfg = RunConfig.model_validate({"domain": "generative", "method": "sft",
                                    "generative": {"student": {"steps": 2, "fractions": [1.0, 0.6]}}})
    settings = sampler_settings(cfg.generative, "student_after")
    assert settings["fractions"] == [1.0, 0.6] and "fractions" not in sampler_settings(cfg.generative, "teacher")
    model, labels = tiny(Convention("rf")), torch.arange(6) % 3
    got = sample(model, labels, generator=torch.Generator().manual_seed(1), **settings)
    z = model.convention.prior((6, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = generate(model.eval(), z, labels, steps=2, fractions=[1.0, 0.6])
        even = generate(model, z, labels, steps=2)
    assert torch.allclose(got, want) and not torch.allclose(got, even)
    for bad in ([1.0], [0.9, 0.5], [1.0, 1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="generative.student.fractions"):
            RunConfig.model_validate({"domain": "generative", "method": "sft",
                                      "generative": {"student": {"steps": 2, "fractions": bad}}})
    with pytest.raises(ValueError, match="dmd trains the generator at evenly spaced"):
        RunConfig.model_validate({"domain": "generative", "method": "dmd",
                                  "generative": {"student": {"steps": 2, "fractions": [1.0, 0.6]}}})
