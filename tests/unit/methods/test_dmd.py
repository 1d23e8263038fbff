"""method=dmd: each term's direction and sign on hand-made tensors, the CA term's alpha scaling and its
decomposition of coupled DMD, the re-noising schedules, the mean/variance KL against a hand computation, the
GAN losses, backward simulation, and the two players (no gradient leaks between generator and critic)."""

import math
from types import SimpleNamespace

import pytest
import torch

from stillroom.config.schema import RunConfig
from stillroom.domains.generative.conventions import Convention
from stillroom.domains.generative.data import GenExample, collate_samples
from stillroom.domains.generative.engine import dmd_direction, meanvar_kl, proxy_loss
from stillroom.domains.generative.models import MlpDenoiser
from stillroom.domains.generative.sampling import generate
from stillroom.methods import dmd_terms as terms
from stillroom.methods.dmd import build_players
from stillroom.train.loop import Player


def _descend(x0: torch.Tensor, g: torch.Tensor, lr: float = 0.1) -> torch.Tensor:
    """One SGD step on ``x`` through the proxy loss with direction ``g``."""
    x = x0.clone().requires_grad_(True)
    proxy_loss(x, g)[0].backward()
    return (x - lr * x.grad).detach()


def test_dm_descent_moves_x_toward_the_teacher_and_away_from_the_critic():
    x = torch.zeros(3, 2)
    g = dmd_direction(x, torch.ones(3, 2), -torch.ones(3, 2))
    moved = _descend(x, g)
    assert (moved > 0).all()  # toward mu_real = +1, away from mu_fake = -1


def test_ca_descent_moves_x_along_cond_minus_uncond_scaled_by_alpha_minus_one():
    x = torch.zeros(2, 2)
    cond, uncond = torch.ones(2, 2), torch.zeros(2, 2)
    for alpha in (2.0, 4.0):
        g = terms.ca_direction(x, cond, uncond, alpha)
        mu_cfg = uncond + alpha * (cond - uncond)
        scale = (x - mu_cfg).abs().mean(dim=1, keepdim=True)
        assert torch.allclose(g * scale, -(alpha - 1) * (cond - uncond))
        assert (_descend(x, g) > 0).all()  # toward the guided teacher (cond side)
    assert torch.allclose(terms.ca_direction(x, cond, uncond, 1.0), torch.zeros(2, 2))  # no guidance, no CA


def test_coupled_dmd_with_cfg_is_dm_plus_ca_at_the_same_point_and_normaliser():
    gen = torch.Generator().manual_seed(0)
    x, cond, uncond, fake = (torch.randn(5, 3, generator=gen) for _ in range(4))
    alpha = 2.5
    mu_cfg = uncond + alpha * (cond - uncond)
    coupled = dmd_direction(x, mu_cfg, fake)
    dm_part = (fake - cond) / terms.per_sample_scale(x, mu_cfg)
    assert torch.allclose(coupled, dm_part + terms.ca_direction(x, cond, uncond, alpha), atol=1e-6)


def test_fractions_lie_in_their_ranges_and_below_input_holds():
    torch.manual_seed(0)
    u = terms.draw_fractions(2000, 0.2, 0.7, "cpu")
    assert u.min() >= 0.2 and u.max() <= 0.7 and u.max() > 0.65 and u.min() < 0.25
    below = terms.ca_fractions(2000, [0.02, 0.98], "below_input", 0.5, "cpu")
    assert below.min() >= 0.02 and below.max() <= 0.5 and below.max() > 0.45
    full = terms.ca_fractions(2000, [0.02, 0.98], "full", 0.5, "cpu")
    assert full.max() > 0.9  # full ignores the input level
    one_step = terms.ca_fractions(2000, [0.02, 0.98], "below_input", 1.0, "cpu")
    assert one_step.max() > 0.9 and one_step.max() <= 0.98  # a one-step input (u = 1) leaves the range whole


def test_meanvar_kl_matches_a_hand_computation():
    x = torch.tensor([[0.0, 2.0], [1.0, 1.0 + 1e-3], [3.0, -1.0]])
    mu_t, var_t = 0.5, 0.8
    want = 0.0
    for row in x.tolist():
        m = sum(row) / 2
        v = max(sum((r - m) ** 2 for r in row) / 2, 1e-6)
        want += 0.5 * ((v + (m - mu_t) ** 2) / var_t - 1 - math.log(v / var_t))
    total, count = meanvar_kl(x, torch.tensor(mu_t), torch.tensor(var_t), "sample")
    assert count == 3 and total.item() == pytest.approx(want, rel=1e-5)
    # batch: each dimension's mean and variance over the batch, times B (the loop divides by B)
    mu_d, var_d = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.5])
    m, v = x.mean(0), x.var(0, unbiased=False)
    per_dim = 0.5 * ((v + (m - mu_d) ** 2) / var_d - 1 - torch.log(v / var_d))
    total, count = meanvar_kl(x, mu_d, var_d, "batch")
    assert total.item() == pytest.approx(3 * per_dim.sum().item(), rel=1e-5)
    # zero exactly at the target statistics
    assert meanvar_kl(x, m, v, "batch")[0].item() == pytest.approx(0.0, abs=1e-6)


def test_data_moments_are_the_targets_that_make_the_kl_vanish():
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 0.7 + 0.3
    mu, var = terms.data_moments(x, "batch")
    assert meanvar_kl(x, mu, var, "batch")[0].item() == pytest.approx(0.0, abs=1e-5)


def test_gan_losses_are_the_non_saturating_softplus_terms():
    fake, real = torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    g_sum, n = terms.gan_generator_loss(fake)
    assert n == 2 and g_sum.item() == pytest.approx(math.log(2) + math.log1p(math.exp(-2)))
    d_sum, _ = terms.gan_head_loss(fake, real)
    want = math.log(2) + math.log1p(math.exp(2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(1))
    assert d_sum.item() == pytest.approx(want)


def _tiny(seed: int = 0, conv: str = "edm") -> MlpDenoiser:
    torch.manual_seed(seed)
    return MlpDenoiser(dim=2, num_classes=3, convention=Convention(conv, sigma_max=20.0), width=16, depth=2)


@pytest.mark.parametrize("conv", ["edm", "rf"])
def test_backward_simulation_input_of_the_last_step_gives_the_deterministic_sampler(conv):
    model = _tiny(conv=conv)
    z = model.convention.prior((6, 2), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x_in, u_in = terms.step_input(model, z, labels, 4, 3, stochastic=False)
    assert u_in == pytest.approx(0.25)
    last = model(x_in, model.convention.time(torch.full((6,), u_in)), labels)
    with torch.no_grad():
        assert torch.allclose(last, generate(model, z, labels, steps=4), atol=1e-5)
    first, u_first = terms.step_input(model, z, labels, 4, 0, stochastic=True)
    assert u_first == 1.0 and torch.equal(first, z)


def _players(**dmd):
    cfg = RunConfig.model_validate({"domain": "generative", "method": "dmd", "dmd": dmd,
                                    "generative": {"student": {"steps": 1}}})
    teacher = _tiny(0).eval().requires_grad_(False)
    student = _tiny(0)
    examples = [GenExample(torch.randn(2), i % 3, str(i)) for i in range(24)]
    ctx = SimpleNamespace(cfg=cfg, teacher_model=teacher, data=SimpleNamespace(train=examples))
    players = build_players(ctx, Player("student", student, None))
    return players, collate_samples(examples[:8])


def test_the_generator_update_leaves_the_critic_and_its_head_without_gradients():
    torch.manual_seed(0)
    (gen, critic), batch = _players(ca_weight=1.0, gan_weight=0.5, kl_weight=1.0, kl_over="batch",
                                    reg_weight=0.25, reg_pairs=16, reg_steps=3)
    result = gen.objective.loss(gen.objective.forward(batch), batch, None)
    result.total.backward()
    assert set(result.parts) == {"dm", "ca", "kl", "reg", "gan"}
    assert all(p.grad is not None for p in gen.model.parameters())
    assert all(p.grad is None for p in critic.trainable())  # the critic and head are another player's
    assert {"dmd/variance", "dmd/norm_dm", "dmd/norm_ca"} <= set(gen.objective.metrics())
    assert critic.updates_per_step == 5 and critic.model is not gen.model


def test_the_critic_update_trains_on_detached_samples_of_the_shared_generator():
    torch.manual_seed(0)
    (gen, critic), batch = _players(gan_weight=0.5, critic_updates=3)
    assert critic.objective.forward.generator is gen.model  # by reference, not a copy
    assert not any(p is q for p in critic.trainable() for q in gen.model.parameters())
    result = critic.objective.loss(critic.objective.forward(batch), batch, None)
    result.total.backward()
    assert set(result.parts) == {"denoise", "gan_head"}
    assert all(p.grad is None for p in gen.model.parameters())
    assert all(p.grad is not None for p in critic.objective.state.parameters())  # the head learns with the critic


def test_the_section_is_refused_outside_the_generative_domain_and_with_bad_ranges():
    with pytest.raises(ValueError, match="set domain: generative"):
        RunConfig.model_validate({"domain": "classifier", "method": "dmd"})
    with pytest.raises(ValueError, match="dmd.ca_range"):
        RunConfig.model_validate({"domain": "generative", "method": "dmd", "dmd": {"ca_range": [0.5, 0.4]}})
    with pytest.raises(ValueError, match="every term weight is 0"):
        RunConfig.model_validate({"domain": "generative", "method": "dmd", "dmd": {"dm_weight": 0}})
    with pytest.raises(ValueError, match="cond_dropout"):
        RunConfig.model_validate({"domain": "generative", "method": "dmd", "dmd": {"ca_weight": 1.0},
                                  "generative": {"teacher": {"cond_dropout": 0.0}}})


@pytest.mark.parametrize("recipe", ["dmd_rings", "decoupled_dmd_rings"])
def test_the_recipes_share_the_rings_teacher_of_generative_rings_sft(recipe):
    """Same teacher settings (guidance and sample steps aside) = the same cache key = one cached teacher."""
    from stillroom.cli.recipe_commands import recipe_path
    from stillroom.config.load import load_config

    skip = {"guidance", "sample_steps"}
    base = load_config(recipe_path("generative_rings_sft")).generative.teacher.model_dump(exclude=skip)
    cfg = load_config(recipe_path(recipe))
    assert cfg.method == "dmd" and cfg.generative.teacher.model_dump(exclude=skip) == base


def test_the_regression_buffer_is_the_teachers_guided_ode_output_drawn_from_the_seed():
    torch.manual_seed(0)
    (gen, _), _ = _players(reg_weight=0.25, reg_pairs=12, reg_steps=3, real_guidance=1.5)
    (again, _), _ = _players(reg_weight=0.25, reg_pairs=12, reg_steps=3, real_guidance=1.5)
    st, teacher = gen.objective.state, gen.objective.teacher
    assert torch.equal(st.reg_z, again.objective.state.reg_z)  # the same seed, the same pairs
    assert st.reg_labels.tolist() == [0, 1, 2] * 4
    with torch.no_grad():
        want = generate(teacher, st.reg_z, st.reg_labels, steps=3, guidance=1.5)
    assert torch.allclose(st.reg_y, want, atol=1e-6)
    assert "reg_y" not in st.state_dict()  # rebuilt from the seed, not checkpointed
